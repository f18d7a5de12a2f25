"""Results files of a run: ``rounds.csv`` (one row per round) and ``summary.json``.

Column and field names are part of the user-facing interface (the experiment harness and users'
notebooks read them): add new ones, never rename. ``summary.json`` is rewritten after every round,
so a crashed or interrupted run still leaves a valid summary with ``completed: false``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROUND_COLUMNS: tuple[str, ...] = (
    "round",
    "accuracy",
    "loss",
    "train_loss",
    "uplink_bytes",
    "downlink_bytes",
    "uplink_bpp",
    "downlink_bpp",
    "clients",
    "failures",
    "rejected",
    "seconds",
    "clipped",
    "aggregate_refused",
    "total_bytes",
    "total_bpp",
    # the global model on the run's validation split (``validation-fraction``); NaN when off.
    "val_accuracy",
    "val_loss",
    # modelled seconds on the run's links (``link-profile``, ``core.link``); NaN when off.
    "link_seconds",
    "link_seconds_total",
    # replies dropped by a modelled deadline (``round-timeout`` with a link profile).
    "late",
    # 1 when trimmed-mean or median had too few updates to trim (the log says why).
    "aggregation_degraded",
)


class ResultsWriter:
    """Writes the results folder of one run.

    Nothing in the folder is touched until the run records its first round (or a resume has
    been validated, ``rewrite_rounds``): a run refused at start never empties the
    ``rounds.csv`` of the run it was meant to continue.
    """

    def __init__(self, run_dir: Path, extra_columns: tuple[str, ...] = ()) -> None:
        self.run_dir = run_dir
        self.columns = ROUND_COLUMNS + tuple(c for c in extra_columns if c not in ROUND_COLUMNS)
        self.rounds_path = run_dir / "rounds.csv"
        self.summary_path = run_dir / "summary.json"
        self.clients_path = run_dir / "clients.csv"
        self._started = False
        self._clients_started = False

    def write_round(self, row: Mapping[str, Any]) -> None:
        """Append one round (the first write of a run starts ``rounds.csv`` afresh); every
        column (common and method-specific) must be present."""
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise KeyError(f"round row lacks columns {missing}")
        if not self._started:
            self.rewrite_rounds([])
        with self.rounds_path.open("a", newline="") as handle:
            csv.writer(handle).writerow([row[c] for c in self.columns])  # full precision

    def rewrite_rounds(self, rows: list[Mapping[str, Any]]) -> None:
        """Replace ``rounds.csv`` with ``rows`` (a resumed run continues after them)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.rounds_path.open("w", newline="") as handle:
            csv.writer(handle).writerow(self.columns)
        self._started = True
        for row in rows:
            self.write_round(row)

    def write_clients(self, rows: list[Mapping[str, Any]]) -> None:
        """Append one round's per-client rows to ``clients.csv`` (columns: the rows' keys, the
        same every round). The first write of a process keeps only the earlier rounds' rows of
        an existing file: a resumed run continues them, a rerun starts afresh."""
        if not rows:
            return
        columns = list(rows[0])
        first_round = min(int(row["round"]) for row in rows)
        if not self._clients_started:
            kept: list[list[str]] = []
            if self.clients_path.exists():
                with self.clients_path.open(newline="") as handle:
                    reader = csv.reader(handle)
                    header = next(reader, None)
                    if header == columns:
                        kept = [r for r in reader if r and float(r[0]) < first_round]
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with self.clients_path.open("w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(columns)
                writer.writerows(kept)
            self._clients_started = True
        with self.clients_path.open("a", newline="") as handle:
            csv.writer(handle).writerows([[row[c] for c in columns] for row in rows])

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Atomically replace ``summary.json`` (write to a temp file, then rename). Non-finite
        numbers become ``null``: the file stays valid JSON whatever a round produced."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.summary_path.with_suffix(".json.tmp")
        text = json.dumps(finite_json(summary), indent=2, sort_keys=False, allow_nan=False)
        tmp.write_text(text + "\n")
        os.replace(tmp, self.summary_path)


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, infinity) replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def read_rounds(path: Path) -> list[dict[str, float]]:
    """Read a ``rounds.csv`` back as numbers (used by tests and the experiment harness)."""
    with path.open(newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
