"""The ClientApp's per-process cache: reused models and partitions change no result.

One process serves partitions 0, 1, 0, 1 (two rounds of two clients) with the cache on, and the
same run again with it off (every message builds its data and model afresh, as a fresh
process would): every client's upload, example count and metrics, the nodes' state and the
final global model must be bit for bit the same.
"""

from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.common import Context, FitIns, FitRes, parameters_to_ndarrays

from compression.lowbit import FP32, lowbit_layers
from contracts.messages import TRAIN_SECONDS
from fl_app import worker_cache
from fl_app.client_app import client_fn
from fl_app.worker_cache import CACHE, WorkerCache
from tools.inprocess import make_contexts, run_inprocess

BASE = {
    "dataset": "digits",
    "model": "digits-cnn-bn",
    "device": "cpu",
    "partitioner": "iid",
    "num-server-rounds": 2,
    "local-epochs": 1,
    "batch-size": 64,
    "min-available-clients": 1,
    "checkpoint": False,
    "seed": 5,
}
#: 4 partitions of which the run uses the first two: ~360 digits each, a fit of 6 steps.
NUM_PARTITIONS = 4


class Recorder:
    """Delegates to the real client and records what each fit returned (no reference cycle,
    so the client, and with it the model's lease, goes as soon as the call returns)."""

    def __init__(self, client: Any, context: Context, records: list) -> None:
        self.client = client
        self.partition = int(context.node_config["partition-id"])
        self.records = records

    def fit(self, ins: FitIns) -> FitRes:
        res = self.client.fit(ins)
        metrics = {k: v for k, v in res.metrics.items() if k != TRAIN_SECONDS}
        self.records.append(
            (
                self.partition,
                int(ins.config["server-round"]),
                parameters_to_ndarrays(res.parameters),
                res.num_examples,
                metrics,
            )
        )
        return res


def run(strategy: str, tmp_path, name: str, **overrides: Any) -> tuple[list, Any, list]:
    records: list = []
    config = {**BASE, "strategy": strategy, "results-dir": str(tmp_path / name), **overrides}
    # Two of four partitions: the nodes of a 4-way split, of which two take part.
    contexts = make_contexts(config, NUM_PARTITIONS)[:2]
    result = run_inprocess(
        config,
        2,
        client_fn=lambda ctx: Recorder(client_fn(ctx), ctx, records),
        contexts=contexts,
    )
    return records, result, contexts


def node_state(context: Context) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, record in context.state.items():
        if hasattr(record, "numpy") or hasattr(record, "items"):
            out[name] = {
                k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in dict(record).items()
            }
    return out


@pytest.fixture(autouse=True)
def fresh_cache():
    """An empty cache, following the environment; one torch thread (both runs of a comparison
    use the same, and on a busy 2-core box two threads make these tiny steps 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    CACHE.clear()
    worker_cache.set_enabled(None)
    yield
    CACHE.clear()
    worker_cache.set_enabled(None)
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("strategy", "overrides"),
    [
        ("fedavg", {}),
        ("fedbif", {}),
        ("fedbat", {}),
        ("lbi-fl", {}),
        ("lbi-fl", {"lbi-mode": "ui8", "lbi-scale-interval": 5}),
    ],
)
def test_cached_worker_matches_fresh_builds_bit_for_bit(tmp_path, strategy, overrides):
    cached, cached_run, cached_contexts = run(strategy, tmp_path, "cached", **overrides)
    stats = CACHE.stats
    # Four fits through one model and two partitions, each built once and lent again.
    assert (stats.model_misses, stats.model_hits, stats.model_uncached) == (1, 3, 0)
    assert (stats.partition_misses, stats.partition_hits) == (2, 2)
    assert CACHE.sizes() == (2, 1)
    with worker_cache.disabled():
        fresh, fresh_run, fresh_contexts = run(strategy, tmp_path, "fresh", **overrides)
    assert CACHE.stats.model_hits == 3  # the fresh run did not touch the cache

    assert [(r[0], r[1]) for r in cached] == [(0, 1), (1, 1), (0, 2), (1, 2)]
    for (part, rnd, arrays, n, metrics), (_, _, want, n_fresh, want_metrics) in zip(
        cached, fresh, strict=True
    ):
        assert n == n_fresh, (part, rnd)
        assert metrics == want_metrics, (part, rnd)
        assert len(arrays) == len(want)
        for a, b in zip(arrays, want, strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b, err_msg=f"partition {part} round {rnd}")
    for a, b in zip(cached_run.global_state, fresh_run.global_state, strict=True):
        np.testing.assert_array_equal(a, b)
    for mine, theirs in zip(cached_contexts, fresh_contexts, strict=True):
        state, want_state = node_state(mine), node_state(theirs)
        assert state.keys() == want_state.keys()
        for name in state:
            for key, value in state[name].items():
                np.testing.assert_array_equal(value, want_state[name][key])


def test_a_reused_lbi_model_forgets_the_previous_clients_scales_and_widths(tmp_path):
    """Evaluation right after another client's fit sees the as-built low-bit layers (FP32)."""
    config = {**BASE, "strategy": "lbi-fl", "lbi-mode": "ui4", "results-dir": str(tmp_path)}
    contexts = make_contexts(config, NUM_PARTITIONS)
    run_inprocess(config, 2, contexts=contexts[:2])
    client = client_fn(contexts[1]).numpy_client  # type: ignore[attr-defined]
    assert CACHE.stats.model_hits >= 1
    for _, layer in lowbit_layers(client.model):
        assert layer.bits == FP32 and layer.steps == 0
        assert float(layer.weight_scale) == 1.0 and float(layer.activation_scale) == 1.0
        assert layer.activation_signed and not any(layer.loss_counts.values())


def test_two_live_clients_never_share_a_model(tmp_path):
    config = {**BASE, "strategy": "fedavg", "results-dir": str(tmp_path)}
    contexts = make_contexts(config, NUM_PARTITIONS)
    first = client_fn(contexts[0]).numpy_client  # type: ignore[attr-defined]
    second = client_fn(contexts[1]).numpy_client  # type: ignore[attr-defined]
    assert first.model is not second.model
    held = first.model
    del first
    gc.collect()
    third = client_fn(contexts[2]).numpy_client  # type: ignore[attr-defined]
    assert third.model is held  # given back when its client went
    assert CACHE.stats.model_uncached == 0


def test_disabled_cache_builds_every_time(tmp_path, monkeypatch):
    monkeypatch.setenv(worker_cache.ENV_VAR, "0")
    config = {**BASE, "strategy": "fedavg", "results-dir": str(tmp_path)}
    context = make_contexts(config, NUM_PARTITIONS)[0]
    first = client_fn(context).numpy_client  # type: ignore[attr-defined]
    held = first.model
    del first
    second = client_fn(context).numpy_client  # type: ignore[attr-defined]
    assert second.model is not held
    assert CACHE.sizes() == (0, 0) and CACHE.stats.model_uncached == 2


def test_models_and_partitions_stay_within_their_bounds():
    cache = WorkerCache(max_partitions=2, max_partition_bytes=1000, max_models=2)
    small = torch.utils.data.TensorDataset(torch.zeros(10), torch.zeros(10))  # 80 bytes
    for key in range(4):
        cache.partition(key, lambda: small)
    assert cache.sizes()[0] == 2
    big = torch.utils.data.TensorDataset(torch.zeros(300))  # 1,200 bytes: never cached
    cache.partition("big", lambda: big)
    assert cache.sizes()[0] == 2
    for key in range(4):
        _, release = cache.lease_model(key, lambda: torch.nn.Linear(2, 2))
        release()
    assert cache.sizes()[1] == 2


def test_a_model_left_with_hooks_is_not_lent_again():
    cache = WorkerCache()
    model, release = cache.lease_model("k", lambda: torch.nn.Linear(2, 2))
    model.register_forward_hook(lambda *args: None)
    release()
    again, _ = cache.lease_model("k", lambda: torch.nn.Linear(2, 2))
    assert again is not model


def test_a_lent_model_comes_back_as_built():
    cache = WorkerCache()
    model, release = cache.lease_model("k", lambda: torch.nn.Sequential(torch.nn.BatchNorm1d(3)))
    built = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(4, 3)).sum().backward()  # moves running stats, counts a batch, grads
    model[0].weight.requires_grad_(False)
    model.eval()
    release()
    again, _ = cache.lease_model("k", lambda: torch.nn.Sequential(torch.nn.BatchNorm1d(3)))
    assert again is model and again.training and again[0].weight.requires_grad
    assert again[0].weight.grad is None
    for key, value in again.state_dict().items():
        assert torch.equal(value, built[key]), key


CHILD = """
import pickle, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from tests.test_worker_cache import run
records, result, _ = run("lbi-fl", Path(sys.argv[1]), "child")
with open(sys.argv[2], "wb") as f:
    pickle.dump((records, result.global_state), f)
"""


@pytest.mark.slow
def test_cached_worker_matches_a_fresh_process(tmp_path):
    """The same comparison against another process with the cache off (no state of this one)."""
    out = tmp_path / "child.pkl"
    env = {**os.environ, worker_cache.ENV_VAR: "0"}
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path), str(out)], cwd=root, env=env, check=True
    )
    with out.open("rb") as f:
        fresh, fresh_state = pickle.load(f)
    cached, cached_run, _ = run("lbi-fl", tmp_path, "cached")
    assert CACHE.stats.model_hits == 3
    for (part, rnd, arrays, n, metrics), (_, _, want, n_fresh, want_metrics) in zip(
        cached, fresh, strict=True
    ):
        assert (n, metrics) == (n_fresh, want_metrics), (part, rnd)
        for a, b in zip(arrays, want, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"partition {part} round {rnd}")
    for a, b in zip(cached_run.global_state, fresh_state, strict=True):
        np.testing.assert_array_equal(a, b)


def test_models_held_by_reference_cycles_cost_one_collection_per_interval(monkeypatch):
    """A client in a reference cycle keeps its model until the garbage collector runs: a
    collection gives it back, but the cache collects at most once per GC_QUIET_SECONDS per key
    (a full collection costs ~0.2 s in a large heap) and builds a fresh model in between."""
    cache = WorkerCache(max_models_per_key=2)
    collections: list[int] = []
    real_collect = gc.collect
    monkeypatch.setattr(
        worker_cache.gc, "collect", lambda *a: collections.append(1) or real_collect(*a)
    )
    now = [0.0]
    monkeypatch.setattr(worker_cache.time, "monotonic", lambda: now[0])

    class Client:
        pass

    def lend() -> Client:
        model, release = cache.lease_model("k", lambda: torch.nn.Linear(2, 2))
        client = Client()
        client.model, client.me = model, client  # a cycle: only the collector frees it
        cache.bind(client, release)
        return client

    def cached(client: Client) -> bool:
        return any(client.model is slot.model for slot in cache._models["k"])

    gc.disable()  # no automatic collection may free the cycles behind the test's back
    try:
        first, second = lend(), lend()  # both alive: the second lease collected in vain
        assert len(collections) == 1 and cached(first) and cached(second)
        del first, second  # now garbage, in cycles
        now[0] += 2 * worker_cache.GC_QUIET_SECONDS
        third, fourth = lend(), lend()  # one collection gives both slots back
        assert len(collections) == 2 and cached(third) and cached(fourth)
        del third, fourth
        now[0] += 1.0  # within the interval: no collection, a fresh uncached model
        fifth = lend()
        assert len(collections) == 2 and not cached(fifth)
        now[0] += worker_cache.GC_QUIET_SECONDS
        sixth = lend()
        assert len(collections) == 3 and cached(sixth)
    finally:
        gc.enable()
