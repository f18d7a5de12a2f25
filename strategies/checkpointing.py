"""A strategy's checkpoint: global model, method state and run progress, one file per run.

The file format is ``core.checkpoint`` (arrays plus one JSON document, replaced atomically):
``global/<i>`` are the global model's wire arrays, ``method/<name>`` a method's own arrays, and
the JSON holds the round, the run's progress (``strategies.reporting.RunProgress``) and the
method's scalars. Restoring checks that the checkpoint belongs to this strategy and model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.checkpoint import load_checkpoint, save_checkpoint
from core.config import RunConfig
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
        **progress.to_meta(),
        "method": method_meta,
    }
    return save_checkpoint(run_dir, arrays, meta)


def load_run(path: Path, cfg: RunConfig, like: list[np.ndarray]) -> RestoredRun:
    """Read a checkpoint written by ``save_run`` for this run's strategy and model."""
    arrays, meta = load_checkpoint(path)
    for key in ("strategy", "model"):
        if meta.get(key) != cfg[key]:
            raise ValueError(
                f"checkpoint {path} was written by {key} {meta.get(key)!r}, "
                f"this run has {key} {cfg[key]!r}"
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
    done = int(meta["round"])
    return RestoredRun(
        round=done,
        global_state=state,
        progress=RunProgress.from_meta(meta, done),
        method_arrays={
            k.removeprefix("method/"): v for k, v in arrays.items() if k.startswith("method/")
        },
        method_meta=meta["method"],
    )
