"""Node state files: exact round trip, refused when foreign or damaged, and a restarted node that
reads its file back trains exactly as one that never stopped (FedBiF's virtual bits)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from core.node_state import NodeStateError, NodeStateStore
from fl_app.client_app import client_fn
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
