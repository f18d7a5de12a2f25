"""Per-round checkpoints: one ``checkpoint.npz`` per run folder, replaced atomically.

The file holds named arrays (the global model as ``global/<i>``, method state as ``method/<name>``)
and one JSON document (round, results so far, method scalars) stored as a uint8 array, so a single
``os.replace`` swaps everything at once: a kill mid-write leaves the previous round's checkpoint.

``core.files.atomic_file`` writes it (mode 0600, never through a planted symbolic link).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from core.files import atomic_file

CHECKPOINT_NAME = "checkpoint.npz"
_META = "__meta__"


def save_checkpoint(run_dir: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write arrays + JSON-able ``meta`` to ``run_dir/checkpoint.npz`` atomically (mode 0600)."""
    path = run_dir / CHECKPOINT_NAME
    encoded = np.frombuffer(json.dumps(meta, allow_nan=True).encode(), dtype=np.uint8)
    with atomic_file(path) as handle:
        np.savez(handle, **arrays, **{_META: encoded})
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a checkpoint written by ``save_checkpoint``; ``path`` may be the file or its folder."""
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files if name != _META}
        meta = json.loads(data[_META].tobytes().decode())
    return arrays, meta
