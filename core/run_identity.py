"""What makes two runs the same run: their configs, less the keys that say where results go.

Two promises rest on it. A resume continues exactly the run it resumes: the config stored with
the checkpoint is compared key by key with the new one, and any difference but a longer
``num-server-rounds`` is refused before anything is written. And results are never clobbered: a
run whose folder already holds another run's results (another config, or as many rounds of
another federation size) is refused with the differing keys, unless ``overwrite`` is set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from core.settings import ConfigError

#: keys that say where results go or how to start, not what the run computes.
LOCATION_KEYS = frozenset({"results-dir", "run-name", "resume-from", "overwrite"})
#: the summary a results folder holds.
SUMMARY_NAME = "summary.json"


def identity_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without ``LOCATION_KEYS``: what decides a run's numbers."""
    return {k: v for k, v in config.items() if k not in LOCATION_KEYS}


def config_fingerprint(config: Mapping[str, Any], length: int = 8) -> str:
    """A short hash of ``identity_config(config)`` (default run names carry it)."""
    blob = json.dumps(identity_config(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def config_differences(
    stored: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    defaults: Mapping[str, Any] | None = None,
    ignore: Iterable[str] = (),
) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, current value)`` for every key the two configs disagree on.

    A key the stored config lacks (written by an older version of the app) counts as its
    default in ``defaults``; keys the current schema no longer has are ignored.
    """
    skip = LOCATION_KEYS | set(ignore)
    defaults = defaults or {}
    diffs = []
    for key in sorted(current):
        if key in skip:
            continue
        if key in stored:
            before = stored[key]
        elif key in defaults:
            before = defaults[key]
        else:
            continue
        now = current[key]
        if not _same_value(before, now):
            diffs.append((key, before, now))
    return diffs


def _same_value(a: Any, b: Any) -> bool:
    """Equal as run-config values: 1 and 1.0 are (JSON may store either), True and 1 are not."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return a == b


def describe_differences(diffs: Iterable[tuple[str, Any, Any]], then: str, now: str) -> str:
    """``key: 'a' (then) vs 'b' (now); ...``: one line."""
    return "; ".join(f"{key}: {a!r} ({then}) vs {b!r} ({now})" for key, a, b in diffs)


def stored_summary(run_dir: Path) -> dict[str, Any] | None:
    """The ``summary.json`` of a results folder, or None when there is none or it is unreadable
    (a folder without a readable summary holds no finished results to protect)."""
    try:
        summary = json.loads((run_dir / SUMMARY_NAME).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def check_results_folder(
    run_dir: Path,
    config: Mapping[str, Any],
    *,
    defaults: Mapping[str, Any],
    resuming_here: bool,
) -> None:
    """Refuse (``ConfigError``, one line) to write into ``run_dir`` when it holds another
    run's results, unless ``config['overwrite']``. A resume from this very folder may extend
    ``num-server-rounds`` (the resume check compares the rest)."""
    if config.get("overwrite"):
        return
    summary = stored_summary(run_dir)
    if summary is None or not isinstance(summary.get("config"), dict):
        return
    ignore = ("num-server-rounds",) if resuming_here else ()
    diffs = config_differences(summary["config"], config, defaults=defaults, ignore=ignore)
    if diffs:
        raise ConfigError(
            f"results folder {run_dir} holds another run's results ("
            f"{describe_differences(diffs, 'there', 'this run')}); choose another run-name or "
            "results-dir, or set overwrite=true to replace them"
        )


def check_federation_size(run_dir: Path, config: Mapping[str, Any], num_clients: int) -> None:
    """Refuse to write into ``run_dir`` when its results came from a federation of another size
    (a 2-client run must not replace a 10-client one of the same config)."""
    if config.get("overwrite") or num_clients <= 0:
        return
    summary = stored_summary(run_dir)
    if summary is None:
        return
    before = summary.get("num_clients")
    if isinstance(before, int) and before > 0 and before != num_clients:
        raise ConfigError(
            f"results folder {run_dir} holds the results of {before} clients, this run has "
            f"{num_clients}; choose another run-name or results-dir, or set overwrite=true"
        )


def check_resume(
    stored: Mapping[str, Any] | None,
    config: Mapping[str, Any],
    *,
    defaults: Mapping[str, Any],
    source: Path,
    rounds_done: int,
) -> None:
    """Refuse a resume whose config differs from the stored one in anything but a
    ``num-server-rounds`` above the rounds done, or whose stored config cannot be read."""
    if stored is None:
        raise ConfigError(
            f"resume-from {source}: no run config stored with the checkpoint or in a "
            f"{SUMMARY_NAME} beside it, so the resumed run could differ unseen; start a new run"
        )
    diffs = config_differences(stored, config, defaults=defaults, ignore=("num-server-rounds",))
    if diffs:
        raise ConfigError(
            f"resume-from {source} would change the run ("
            f"{describe_differences(diffs, 'stored', 'now')}); resume with the stored values, "
            "or start a new run"
        )
    rounds = config.get("num-server-rounds")
    if isinstance(rounds, int) and rounds <= rounds_done:
        raise ConfigError(
            f"resume-from {source} already holds {rounds_done} rounds; raise num-server-rounds "
            f"(now {rounds}) to continue"
        )
