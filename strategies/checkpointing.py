"""A strategy's checkpoint: global model, method state and run progress, one file per run.

The file format is ``core.checkpoint`` (arrays plus one JSON document, replaced atomically):
``global/<i>`` are the global model's wire arrays, ``method/<name>`` a method's own arrays, and
the JSON holds the round, the run's progress (``strategies.reporting.RunProgress``) and the
method's scalars. Restoring checks that the checkpoint belongs to this strategy and model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.checkpoint import load_checkpoint, save_checkpoint
from core.config import RunConfig
from core.run_identity import check_resume, stored_summary
from strategies.aggregation import aggregate_problem
from strategies.reporting import RunProgress


@dataclass
class RestoredRun:
    """What a checkpoint gives back to a strategy."""

    round: int
    global_state: list[np.ndarray]
    progress: RunProgress
    method_arrays: dict[str, np.ndarray]
    method_meta: dict[str, Any]


def save_run(
    run_dir: Path,
    cfg: RunConfig,
    server_round: int,
    global_state: list[np.ndarray],
    progress: RunProgress,
    method_arrays: dict[str, np.ndarray],
    method_meta: dict[str, Any],
) -> Path:
    """Everything a restart needs to go on at ``server_round`` + 1."""
    arrays = {f"global/{i}": a for i, a in enumerate(global_state)}
    arrays.update({f"method/{name}": a for name, a in method_arrays.items()})
    meta = {
        "strategy": cfg.strategy,
        "model": cfg.model,
        "round": server_round,
        # the whole run config: a resume is compared with it key by key (core.run_identity)
        "config": cfg.as_dict(),
        **progress.to_meta(),
        "method": method_meta,
    }
    return save_checkpoint(run_dir, arrays, meta)


def stored_config(path: Path, meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run config a checkpoint was written with: its own copy, or (a checkpoint written
    before checkpoints held it) the ``summary.json`` of its folder; None when neither has it."""
    stored = meta.get("config")
    if not isinstance(stored, dict):
        summary = stored_summary(path if path.is_dir() else path.parent)
        stored = summary.get("config") if summary else None
    return stored if isinstance(stored, dict) else None


def check_resume_config(path: Path, cfg: RunConfig, defaults: Mapping[str, Any]) -> None:
    """Refuse a resume from ``path`` that would change the run (before anything starts)."""
    _, meta = load_checkpoint(path)
    check_resume(
        stored_config(path, meta),
        cfg.as_dict(),
        defaults=defaults,
        source=path,
        rounds_done=int(meta.get("round", 0)),
    )


def load_run(
    path: Path, cfg: RunConfig, like: list[np.ndarray], defaults: Mapping[str, Any]
) -> RestoredRun:
    """Read a checkpoint written by ``save_run`` for this run's strategy and model, refusing a
    run config that differs from the stored one (``core.run_identity.check_resume``; keys the
    stored config lacks count as their ``defaults``)."""
    arrays, meta = load_checkpoint(path)
    for key in ("strategy", "model"):
        if meta.get(key) != cfg[key]:
            raise ValueError(
                f"checkpoint {path} was written by {key} {meta.get(key)!r}, "
                f"this run has {key} {cfg[key]!r}"
            )
    check_resume(
        stored_config(path, meta),
        cfg.as_dict(),
        defaults=defaults,
        source=path,
        rounds_done=int(meta["round"]),
    )
    state = [arrays[f"global/{i}"] for i in range(len(like))]
    for index, (got, want) in enumerate(zip(state, like, strict=True)):
        if got.shape != want.shape:
            raise ValueError(f"checkpoint {path} does not match this model (array {index})")
        if got.dtype != np.float32 or not np.all(np.isfinite(got)):
            raise ValueError(
                f"checkpoint {path} holds a non-finite or non-float32 global model (array "
                f"{index}); refusing to resume from it"
            )
    problem = aggregate_problem(state)  # the bound every aggregate meets
    if problem is not None:
        raise ValueError(f"checkpoint {path} holds no model this run could have made: {problem}")
    done = int(meta["round"])
    if not 0 <= done <= len(meta.get("history", [])):
        raise ValueError(f"checkpoint {path} claims round {done} with fewer rounds recorded")
    return RestoredRun(
        round=done,
        global_state=state,
        progress=RunProgress.from_meta(meta, done),
        method_arrays={
            k.removeprefix("method/"): v for k, v in arrays.items() if k.startswith("method/")
        },
        method_meta=meta["method"],
    )
