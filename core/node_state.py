"""Node state that survives a SuperNode restart: ``context.state`` mirrored in a file.

Flower keeps a node's ``Context`` (and so ``context.state``: FedBiF's virtual-bit magnitudes,
EF-SignSGD's residuals, SignSGD's held model, LBI-FL's widths) in the SuperNode's memory only; a
restarted SuperNode starts empty and its client would silently train from a fresh state. With
``state-dir`` in a SuperNode's node config, the ClientApp writes the node's state after every fit
and reads it back when it finds the state empty.

File: ``<state-dir>/node-state-run<run_id>-<strategy>-p<partition>.npz``, written to a temporary
name and renamed (a reader sees the old file or the new one, never half of one). Arrays are
stored as ``array/<record>/<key>``; config records and a header go as one JSON document in
``meta``. On load the header must name this format, run, strategy and partition (a state file of
another run or method is never applied), every member must read back (NumPy checks the zip CRCs)
and every float array must be finite; a file that fails is ignored with a warning and the node
starts fresh, as it would without the file.

In simulation ``context.state`` stays the fast path: no node has a ``state-dir``.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.common import Array, ArrayRecord, ConfigRecord, RecordDict

#: version of the file layout; a file of another version is ignored.
FORMAT = 1


class NodeStateError(ValueError):
    """A node state file that must not be applied (wrong run, damaged, non-finite)."""


@dataclass(frozen=True)
class NodeStateStore:
    """Where one node keeps its state for one run of one strategy."""

    directory: Path
    run_id: int
    strategy: str
    partition_id: int

    @property
    def path(self) -> Path:
        name = f"node-state-run{self.run_id}-{self.strategy}-p{self.partition_id}.npz"
        return self.directory / name

    def _header(self) -> dict[str, object]:
        return {
            "format": FORMAT,
            "run_id": self.run_id,
            "strategy": self.strategy,
            "partition_id": self.partition_id,
        }

    def save(self, state: RecordDict) -> None:
        """Write ``state`` atomically (array and config records; metric records are not kept)."""
        arrays: dict[str, np.ndarray] = {}
        configs: dict[str, dict[str, object]] = {}
        for name, record in state.items():
            if isinstance(record, ArrayRecord):
                for key, array in record.items():
                    arrays[f"array/{name}/{key}"] = array.numpy()
            elif isinstance(record, ConfigRecord):
                configs[name] = dict(record)
        meta = json.dumps({**self._header(), "configs": configs, "arrays": sorted(arrays)})
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("wb") as handle:
            np.savez(handle, meta=np.frombuffer(meta.encode(), dtype=np.uint8), **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)

    def load(self) -> RecordDict | None:
        """The saved state, None when there is no file; ``NodeStateError`` when it must not
        be applied."""
        if not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                arrays = {name: data[name] for name in meta.get("arrays", [])}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as err:
            raise NodeStateError(f"{self.path}: unreadable ({type(err).__name__}: {err})") from None
        header = {key: meta.get(key) for key in self._header()}
        if header != self._header():
            raise NodeStateError(f"{self.path}: written for {header}, not {self._header()}")
        state = RecordDict()
        records: dict[str, dict[str, Array]] = {}
        for name, array in arrays.items():
            _, record, key = name.split("/", 2)
            if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
                raise NodeStateError(f"{self.path}: {record}/{key} holds non-finite values")
            records.setdefault(record, {})[key] = Array(np.ascontiguousarray(array))
        for record, values in records.items():
            state[record] = ArrayRecord(values)
        for record, values in meta.get("configs", {}).items():
            state[record] = ConfigRecord(values)
        return state
