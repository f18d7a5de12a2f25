"""Node state files: exact round trip, refused when foreign or damaged, and a restarted node that
reads its file back trains exactly as one that never stopped (FedBiF's virtual bits)."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from flwr.common import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from core import node_state
from core.config import ConfigError
from core.node_state import NodeStateError, NodeStateStore
from fl_app.client_app import client_fn, node_state_store
from tools.inprocess import make_contexts, run_inprocess


def sample_state() -> RecordDict:
    state = RecordDict()
    state["fedbif-vbi"] = ArrayRecord({"magnitudes": Array(np.linspace(0, 1, 7, dtype="f2"))})
    state["lbi"] = ConfigRecord({"weight-bits": 6, "decided-round": 4, "loss": 0.25})
    return state


def test_round_trip_is_exact(tmp_path):
    store = NodeStateStore(tmp_path, run_id=11, strategy="fedbif", partition_id=2)
    store.save(sample_state())
    loaded = store.load()
    assert loaded is not None and set(loaded.keys()) == {"fedbif-vbi", "lbi"}
    got = loaded["fedbif-vbi"]["magnitudes"].numpy()
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, np.linspace(0, 1, 7, dtype="f2"))
    assert dict(loaded["lbi"]) == {"weight-bits": 6, "decided-round": 4, "loss": 0.25}
    assert not list(tmp_path.glob("*.tmp"))  # written under a temporary name, then renamed
    assert NodeStateStore(tmp_path, 11, "fedbif", 3).load() is None  # no file: nothing to apply


@pytest.mark.parametrize(
    ("run_id", "strategy", "partition"), [(12, "fedbif", 2), (11, "fedbat", 2), (11, "fedbif", 0)]
)
def test_a_foreign_file_is_refused(tmp_path, run_id, strategy, partition):
    store = NodeStateStore(tmp_path, 11, "fedbif", 2)
    store.save(sample_state())
    other = NodeStateStore(tmp_path, run_id, strategy, partition)
    other.path.write_bytes(store.path.read_bytes())  # e.g. copied by hand
    with pytest.raises(NodeStateError, match="written for"):
        other.load()


def test_damaged_or_non_finite_files_are_refused(tmp_path):
    store = NodeStateStore(tmp_path, 1, "fedbif", 0)
    store.save(sample_state())
    data = store.path.read_bytes()
    store.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(NodeStateError, match="unreadable"):
        store.load()
    state = sample_state()
    state["fedbif-vbi"] = ArrayRecord({"magnitudes": Array(np.array([1.0, np.nan], "f2"))})
    store.save(state)
    with pytest.raises(NodeStateError, match="non-finite"):
        store.load()


FEDBIF = {
    "strategy": "fedbif",
    "device": "cpu",
    "num-server-rounds": 3,
    "local-epochs": 1,
    "partitioner": "iid",
    "checkpoint": False,
    "seed": 4,
}


def restarting(node_id: int, at_round: int):  # noqa: ANN201
    """A client_fn whose node ``node_id`` 'restarts' before round ``at_round``: its Context
    comes back with an empty state, as a restarted SuperNode's does."""

    def fn(context: Context):  # noqa: ANN202
        fn.calls += 1  # type: ignore[attr-defined]
        # In-process, round r calls nodes 1, 2, 3 in order: call (r - 1) * 3 + node_id.
        if context.node_id == node_id and fn.calls == (at_round - 1) * 3 + node_id:
            context.state = RecordDict()
        return client_fn(context)

    fn.calls = 0  # type: ignore[attr-defined]
    return fn


def run_with(tmp_path, name: str, state_dir: bool, restart: bool) -> list[dict]:  # noqa: FBT001
    raw = {**FEDBIF, "results-dir": str(tmp_path), "run-name": name}
    contexts = make_contexts(raw, 3)
    if state_dir:
        for context in contexts:
            context.node_config["state-dir"] = str(tmp_path / f"{name}-state")
    fn = restarting(1, 2) if restart else client_fn
    return run_inprocess(raw, 3, client_fn=fn, contexts=contexts).history


def test_a_restarted_node_with_a_state_dir_trains_as_if_it_never_stopped(tmp_path):
    straight = run_with(tmp_path, "straight", state_dir=False, restart=False)
    kept = run_with(tmp_path, "kept", state_dir=True, restart=True)
    lost = run_with(tmp_path, "lost", state_dir=False, restart=True)
    for key in ("train_loss", "loss", "accuracy"):
        assert [r[key] for r in kept[1:]] == [r[key] for r in straight[1:]], key
    assert lost[2]["train_loss"] != straight[2]["train_loss"]  # the control: state did matter


# ------------------------------------------------------------------------------ files on disk
def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def write_state(
    path: Path, meta: object, arrays: dict[str, bytes | np.ndarray], **zip_args
) -> None:
    """A state file as an attacker or a broken disk might leave it: ``meta`` (JSON-encoded
    unless bytes) and the given members, each an array or raw ``.npy`` bytes."""
    raw = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    members = {"meta": np.frombuffer(raw, np.uint8), **arrays}
    with zipfile.ZipFile(path, "w", **zip_args) as archive:
        for name, member in members.items():
            archive.writestr(f"{name}.npy", member if isinstance(member, bytes) else npy(member))


def saved_parts(store: NodeStateStore) -> tuple[dict, dict[str, np.ndarray]]:
    """The meta document and arrays of the file ``store.save`` writes for ``sample_state``."""
    store.save(sample_state())
    with np.load(store.path) as data:
        meta = json.loads(data["meta"].tobytes())
        return meta, {name: data[name] for name in data.files if name != "meta"}


MAGNITUDES = "array/fedbif-vbi/magnitudes"


def huge_header() -> bytes:
    """A .npy member whose header claims 2**40 float16 values and holds 14 bytes."""
    buffer = io.BytesIO()
    header = {"descr": "<f2", "fortran_order": False, "shape": (1 << 40,)}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + bytes(14)


def malformed(kind: str, meta: dict, arrays: dict) -> tuple[object, dict]:
    """(meta, arrays) of one kind of malformed file, from a good file's parts."""
    specs = meta["arrays"]
    if kind == "meta-not-an-object":
        return [meta], arrays
    if kind == "meta-not-utf8":
        return b"\xff\xfe{", arrays
    if kind == "old-format":
        return {**meta, "format": 1}, arrays
    if kind == "unlisted-member":
        return meta, {**arrays, "array/extra/x": np.zeros(3, "f4")}
    if kind == "missing-member":
        return meta, {}
    if kind == "bad-array-name":
        return {**meta, "arrays": {"array/magnitudes": specs[MAGNITUDES]}}, {
            "array/magnitudes": arrays[MAGNITUDES]
        }
    if kind == "complex-dtype":
        spec = {"dtype": "<c8", "shape": [7]}
        return {**meta, "arrays": {MAGNITUDES: spec}}, {MAGNITUDES: arrays[MAGNITUDES] + 0j}
    if kind == "object-dtype":
        spec = {"dtype": "|O", "shape": [1]}
        return {**meta, "arrays": {MAGNITUDES: spec}}, {MAGNITUDES: np.array([{}], dtype=object)}
    if kind == "dtype-not-as-listed":
        return meta, {MAGNITUDES: arrays[MAGNITUDES].astype("f4")}
    if kind == "shape-not-as-listed":
        return meta, {MAGNITUDES: arrays[MAGNITUDES][:3]}
    if kind == "header-claims-a-huge-array":
        spec = {"dtype": "<f2", "shape": [1 << 40]}
        return {**meta, "arrays": {MAGNITUDES: spec}}, {MAGNITUDES: huge_header()}
    if kind == "nan-in-array":
        return meta, {MAGNITUDES: np.array([0, np.nan, 1, 1, 1, 1, 1], "f2")}
    if kind == "nan-in-config":
        return {**meta, "configs": {"lbi": {"loss": math.nan}}}, arrays
    if kind == "config-of-wrong-type":
        return {**meta, "configs": {"lbi": {"weight-bits": None}}}, arrays
    raise AssertionError(kind)


#: each kind of malformed file and the reason its refusal gives
MALFORMED = [
    ("meta-not-an-object", "not a JSON object"),
    ("meta-not-utf8", "unreadable"),
    ("old-format", "written for"),
    ("unlisted-member", "not the ones its meta lists"),
    ("missing-member", "not the ones its meta lists"),
    ("bad-array-name", "array/<record>/<key>"),
    ("complex-dtype", "not bool, integer or float"),
    ("object-dtype", "not bool, integer or float"),
    ("dtype-not-as-listed", "its meta says <f2"),
    ("shape-not-as-listed", r"its meta says \[7\]"),
    ("header-claims-a-huge-array", "14 bytes of data"),
    ("nan-in-array", "non-finite"),
    ("nan-in-config", "non-finite value NaN"),
    ("config-of-wrong-type", "config record 'lbi'"),
]


def assert_refused(store: NodeStateStore, match: str | None = None) -> None:
    """load() raises NodeStateError, one line that names the file (and ``match``)."""
    with pytest.raises(NodeStateError, match=match) as caught:
        store.load()
    message = str(caught.value)
    assert message.startswith(f"{store.path}: ") and "\n" not in message, message


@pytest.mark.parametrize(("kind", "reason"), MALFORMED, ids=[kind for kind, _ in MALFORMED])
def test_a_malformed_state_file_is_refused_naming_it(tmp_path, kind, reason):
    store = NodeStateStore(tmp_path, 1, "fedbif", 0)
    meta, arrays = malformed(kind, *saved_parts(store))
    write_state(store.path, meta, arrays)
    assert_refused(store, reason)


@pytest.mark.parametrize(
    ("content", "match"),
    [(b"", "empty"), (b"garbage " * 64, "unreadable"), (npy(np.zeros(4)), "unreadable")],
    ids=["empty", "garbage", "npy-not-npz"],
)
def test_a_file_that_is_no_state_file_at_all_is_refused(tmp_path, content, match):
    store = NodeStateStore(tmp_path, 1, "fedbif", 0)
    store.path.write_bytes(content)
    assert_refused(store, match)


def test_a_small_file_declaring_more_than_the_cap_is_refused_before_reading(tmp_path, monkeypatch):
    store = NodeStateStore(tmp_path, 1, "fedbif", 0)
    meta, _ = saved_parts(store)
    zeros = np.zeros(100_000, "f2")  # 200 kB that deflate to a few hundred bytes
    meta["arrays"] = {MAGNITUDES: {"dtype": "<f2", "shape": [100_000]}}
    write_state(store.path, meta, {MAGNITUDES: zeros}, compression=zipfile.ZIP_DEFLATED)
    assert store.path.stat().st_size < 10_000
    assert store.load() is not None  # within the real cap: a valid file
    monkeypatch.setattr(node_state, "MAX_STATE_BYTES", 100_000)
    monkeypatch.setattr(zipfile.ZipFile, "open", None)  # nothing may be read any more
    assert_refused(store, "declare")


def state_context(state_dir: Path) -> Context:
    context = make_contexts({**FEDBIF, "results-dir": str(state_dir.parent)}, 1)[0]
    context.node_config["state-dir"] = str(state_dir)
    return context


def test_a_refused_file_is_logged_and_the_node_starts_fresh(tmp_path, caplog):
    context = state_context(tmp_path / "state")
    store = node_state_store(context, "fedbif", 0)
    assert store is not None and len(context.state) == 0
    store.path.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        assert node_state_store(context, "fedbif", 0) == store
    assert len(context.state) == 0
    assert any(str(store.path) in record.getMessage() for record in caplog.records)


def unwritable_cases() -> list:
    cases = [pytest.param("file", "not a directory", id="a-file"),
             pytest.param("file/state", "Not a directory", id="under-a-file")]  # fmt: skip
    root = os.geteuid() == 0
    reason = "root writes into read-only folders"
    cases.append(pytest.param("read-only", "Permission denied", id="read-only",
                              marks=pytest.mark.skipif(root, reason=reason)))  # fmt: skip
    return cases


@pytest.mark.parametrize(("name", "why"), unwritable_cases())
def test_an_unwritable_state_dir_fails_at_the_first_message(tmp_path, name, why):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "read-only").mkdir(mode=0o500)
    context = state_context(tmp_path / name)
    with pytest.raises(ConfigError, match=why) as caught:
        client_fn(context)  # before the partition is loaded or anything trains
    assert str(tmp_path / name) in str(caught.value)
    assert "\n" not in str(caught.value)
