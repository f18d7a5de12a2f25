"""Node state that survives a SuperNode restart: ``context.state`` mirrored in a file.

Flower keeps a node's ``Context`` (and so ``context.state``: FedBiF's virtual-bit magnitudes,
EF-SignSGD's residuals, SignSGD's held model, LBI-FL's widths) in the SuperNode's memory only; a
restarted SuperNode starts empty and its client would silently train from a fresh state. With
``state-dir`` in a SuperNode's node config, the ClientApp writes the node's state after every fit
and reads it back when it finds the state empty.

File: ``<state-dir>/node-state-run<run_id>-<strategy>-p<partition>.npz``, mode 0600, written to a
temporary name and renamed (``core.files.atomic_file``: a reader sees the old file or the new
one, never half of one, and no write follows a planted symlink). Arrays are stored as
``array/<record>/<key>``; config records, a header and each array's dtype and shape go as one
JSON document in ``meta``.

The file is data from disk, so loading trusts nothing in it: the header must name this format,
run, strategy and partition (a state file of another run or method is never applied); the members
must be exactly ``meta`` and the arrays it lists, each of the dtype and shape it declares, of a
plain numeric dtype, every float finite (config values too); the file and the sum of its
members' declared sizes may be at most ``MAX_STATE_BYTES``, checked before anything is read (a
small file must not inflate to gigabytes), and every byte read is CRC-checked. A file that
fails any of it raises ``NodeStateError`` naming the file and the reason; the ClientApp then
warns and starts fresh, as it would without the file.

In simulation ``context.state`` stays the fast path: no node has a ``state-dir``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

import numpy as np
from flwr.common import Array, ArrayRecord, ConfigRecord, RecordDict

from core.files import atomic_file
from core.settings import ConfigError

#: version of the file layout; a file of another version is ignored.
FORMAT = 2
#: most bytes a state file's members may declare in all (the largest state kept here, SignSGD's
#: float32 copy of the model, is 4 bytes per parameter: 2 GiB is a 500M-parameter model).
MAX_STATE_BYTES = 2 << 30
#: dtype kinds a state array may have: bool, signed and unsigned integers, floats.
ARRAY_KINDS = "biuf"
_META = "meta"


class NodeStateError(ValueError):
    """A node state file that must not be applied (wrong run, damaged, malformed, non-finite)."""


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

    def check_writable(self) -> None:
        """``ConfigError`` unless the state file can be written: the first fit would train and
        then lose its reply to the failing save, so a misconfigured node fails before that."""
        where = f"node config state-dir {self.directory}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.directory, prefix=".write-check-")
            os.close(fd)
            os.unlink(probe)
        except FileExistsError:
            raise ConfigError(f"{where}: exists and is not a directory") from None
        except OSError as err:
            raise ConfigError(f"{where}: cannot write there ({err.strerror or err})") from None
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{where}: {self.path.name} there is not a regular file; remove it")

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
        specs = {
            name: {"dtype": array.dtype.str, "shape": list(array.shape)}
            for name, array in arrays.items()
        }
        meta = json.dumps({**self._header(), "configs": configs, "arrays": specs})
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path) as handle:
            np.savez(handle, **{_META: np.frombuffer(meta.encode(), dtype=np.uint8)}, **arrays)

    def load(self) -> RecordDict | None:
        """The saved state, None when there is no file; ``NodeStateError`` (one line naming the
        file) for anything else that keeps it from being applied."""
        try:
            # No symlink (the writer never makes one); O_NONBLOCK: a FIFO there must not hang.
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as err:
            reason = "is a symbolic link" if err.errno == errno.ELOOP else err.strerror
            raise NodeStateError(f"{self.path}: cannot open it ({reason})") from None
        with os.fdopen(fd, "rb") as handle:
            try:
                return _read_state(handle, self._header())
            except NodeStateError as err:
                message = f"{self.path}: {err}"
            except Exception as err:  # whatever else a damaged file makes a reader raise
                message = f"{self.path}: unreadable ({type(err).__name__}: {err})"
        raise NodeStateError(" ".join(message.split())) from None


def _refuse(reason: str) -> NoReturn:
    raise NodeStateError(reason)


def _read_state(handle: IO[bytes], header: dict[str, object]) -> RecordDict:
    """The state in an open file; ``NodeStateError`` (the reason alone) when it is malformed."""
    info = os.fstat(handle.fileno())
    if not stat.S_ISREG(info.st_mode):
        _refuse("not a regular file")
    if info.st_size == 0:
        _refuse("empty file")
    if info.st_size > MAX_STATE_BYTES:
        _refuse(f"{info.st_size} bytes, over the {MAX_STATE_BYTES} a state file may have")
    with zipfile.ZipFile(handle) as archive:
        members = archive.infolist()
        declared = sum(member.file_size for member in members)
        if declared > MAX_STATE_BYTES:
            _refuse(f"its members declare {declared} bytes, over the {MAX_STATE_BYTES} allowed")
        names = [member.filename for member in members]
        if len(names) != len(set(names)) or f"{_META}.npy" not in names:
            _refuse(f"members {sorted(names)}: no meta, or a name twice")
        meta = _parse_meta(_read_npy(archive, f"{_META}.npy", {"dtype": "|u1", "shape": None}))
        if (found := {key: meta.get(key) for key in header}) != header:
            _refuse(f"written for {found}, not {header}")
        specs = _array_specs(meta.get("arrays"))
        if set(names) != {f"{_META}.npy", *(f"{name}.npy" for name in specs)}:
            _refuse(f"members {sorted(names)} are not the ones its meta lists")
        records: dict[str, dict[str, Array]] = {}
        for name, spec in specs.items():
            array = _read_npy(archive, f"{name}.npy", spec)
            _, record, key = name.split("/", 2)
            if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                _refuse(f"{record}/{key} holds non-finite values")
            records.setdefault(record, {})[key] = Array(np.ascontiguousarray(array))
    configs = meta.get("configs")
    if not isinstance(configs, dict) or not all(isinstance(v, dict) for v in configs.values()):
        _refuse("its config records are not JSON objects")
    if clash := sorted(set(records) & set(configs)):
        _refuse(f"records {clash} are both array and config records")
    state = RecordDict()
    for record, values in records.items():
        state[record] = ArrayRecord(values)
    for record, values in configs.items():
        try:
            state[record] = ConfigRecord(values)
        except (TypeError, ValueError) as err:
            _refuse(f"config record {record!r}: {err}")
    return state


def _parse_meta(raw: np.ndarray) -> dict[str, Any]:
    """The JSON document of the ``meta`` member; NaN and infinities are refused as it is read."""

    def non_finite(constant: str) -> NoReturn:
        _refuse(f"its meta holds the non-finite value {constant}")

    meta = json.loads(raw.tobytes().decode("utf-8"), parse_constant=non_finite)
    if not isinstance(meta, dict):
        _refuse("its meta is not a JSON object")
    return meta


def _array_specs(specs: object) -> dict[str, dict[str, Any]]:
    """``array/<record>/<key>`` -> {dtype, shape}, checked to be well formed."""
    if not isinstance(specs, dict):
        _refuse("its meta lists no arrays")
    for name, spec in specs.items():
        parts = name.split("/", 2)
        if len(parts) != 3 or parts[0] != "array" or not all(parts[1:]):
            _refuse(f"array name {name!r} is not array/<record>/<key>")
        if not (
            isinstance(spec, dict)
            and isinstance(spec.get("dtype"), str)
            and isinstance(shape := spec.get("shape"), list)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        ):
            _refuse(f"array {name!r} has no valid dtype and shape in its meta")
    return specs


def _read_npy(archive: zipfile.ZipFile, member: str, spec: dict[str, Any]) -> np.ndarray:
    """One ``.npy`` member, only after its header matches ``spec`` (dtype, and shape unless it
    is None) and its declared size: nothing is allocated from a size the file merely claims."""
    with archive.open(member) as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            _refuse(f"{member}: .npy version {version} is not one NumPy's savez writes")
        if dtype.kind not in ARRAY_KINDS:
            _refuse(f"{member}: dtype {dtype.str} is not bool, integer or float")
        if dtype.str != spec["dtype"]:
            _refuse(f"{member}: dtype {dtype.str}, its meta says {spec['dtype']}")
        if spec["shape"] is not None and list(shape) != spec["shape"]:
            _refuse(f"{member}: shape {list(shape)}, its meta says {spec['shape']}")
        data = handle.read()  # bounded by the member's declared size; at the end, the CRC check
    if len(data) != math.prod(shape) * dtype.itemsize:
        _refuse(f"{member}: {len(data)} bytes of data for a {list(shape)} {dtype.str} array")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
