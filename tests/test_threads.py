"""Thread counts: ``torch-threads`` pins torch's CPU threads, 0 (auto) gives each process the CPUs
its run gives it (Ray's ``client-resources-num-cpus``, the node config's ``num-cpus``, one thread
in-process and in the server), and ``summary.json`` records what clients and server used."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.common import Context

from core.config import ConfigError
from core.torch_utils import apply_thread_count, auto_thread_count, available_cpus
from fl_app.client_app import client_fn, given_cpus
from fl_app.methods import load_config
from tools.inprocess import run_inprocess


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_zero_keeps_the_count_and_a_positive_count_is_set(restore_threads):
    torch.set_num_threads(2)
    assert apply_thread_count(0) == 2 and torch.get_num_threads() == 2
    assert apply_thread_count(1) == 1 and torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="threads must be >= 0"):
        apply_thread_count(-1)


def test_negative_key_is_refused():
    with pytest.raises(ConfigError, match="torch-threads"):
        load_config({"torch-threads": -2})


def thread_recorder(seen: list[int]):
    """A client_fn whose fits append the thread count they train at to ``seen``; every message
    starts at 2 threads, as a fresh worker process would."""

    def recording(context: Context):
        torch.set_num_threads(2)
        client = client_fn(context)
        original_fit = client.fit

        def fit(ins):
            seen.append(torch.get_num_threads())
            return original_fit(ins)

        client.fit = fit
        return client

    return recording


def test_pinned_run_trains_and_reports_at_the_pinned_count(tmp_path, restore_threads):
    """With ``torch-threads=1`` every client fit runs at 1 thread, even where its process was at
    2 when the message came (reset here, after the server had pinned it), and ``summary.json``
    records the count."""
    torch.set_num_threads(2)
    seen: list[int] = []
    recording = thread_recorder(seen)

    run_config = {
        "strategy": "fedavg",
        "device": "cpu",
        "num-server-rounds": 2,
        "local-epochs": 1,
        "seed": 5,
        "torch-threads": 1,
        "results-dir": str(tmp_path),
        "run-name": "pinned",
    }
    run_inprocess(run_config, num_clients=3, client_fn=recording)
    assert seen == [1] * 6
    summary = json.loads((tmp_path / "pinned" / "summary.json").read_text())
    assert summary["torch_threads"] == 1 and summary["config"]["torch-threads"] == 1


def test_auto_count_takes_the_given_cpus_and_a_pinned_count_wins():
    assert auto_thread_count(0, None) == 1
    assert auto_thread_count(0, 2.0) == 2
    assert auto_thread_count(0, 2.5) == 2  # Ray may give fractions: whole threads only
    assert auto_thread_count(0, 0.5) == 1
    assert auto_thread_count(3, 1.0) == 3
    with pytest.raises(ValueError, match="threads must be >= 0"):
        auto_thread_count(-1, 1.0)


def _context(node_config: dict) -> Context:
    from flwr.common import RecordDict

    return Context(run_id=0, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_given_cpus_read_from_the_node_config_else_the_environment_else_the_machine(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert given_cpus(_context({"num-cpus": 3})) == 3.0
    assert given_cpus(_context({})) == float(available_cpus())
    # Several SuperNodes on one host are started with OMP_NUM_THREADS=1 (deploy/local.py).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert given_cpus(_context({})) == 1.0
    assert given_cpus(_context({"num-cpus": 3})) == 3.0  # the node config still wins
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert given_cpus(_context({})) == float(available_cpus())
    with pytest.raises(ConfigError, match="num-cpus"):
        given_cpus(_context({"num-cpus": "many"}))


@pytest.mark.e2e
def test_given_cpus_inside_a_ray_actor_are_its_assigned_cpus():
    """A Ray actor started with num_cpus=1 (as a simulation's client-resources-num-cpus=1
    starts it) reads 1 CPU, whatever the machine has."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:

        @ray.remote(num_cpus=1)
        class Probe:
            def cpus(self) -> tuple[float | None, int]:
                from core.torch_utils import auto_thread_count

                given = given_cpus(_context({}))
                return given, auto_thread_count(0, given)

        assert ray.get(Probe.remote().cpus.remote()) == (1.0, 1)
    finally:
        ray.shutdown()


def test_default_in_process_run_trains_at_one_thread_and_records_both_counts(
    tmp_path, restore_threads
):
    """torch-threads=0 in the in-process runner: one thread per client and in the server,
    though the process was at 2 threads; summary.json records both."""
    torch.set_num_threads(2)
    seen: list[int] = []
    recording = thread_recorder(seen)

    run_config = {
        "strategy": "fedavg",
        "device": "cpu",
        "num-server-rounds": 1,
        "local-epochs": 1,
        "results-dir": str(tmp_path),
        "run-name": "auto",
    }
    run_inprocess(run_config, num_clients=2, client_fn=recording)
    assert seen == [1, 1]
    summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert summary["torch_threads"] == 1 and summary["client_torch_threads"] == [1]
    assert summary["server_torch_threads"] == 1


def test_server_threads_key_sets_the_server_alone(tmp_path, restore_threads):
    run_config = {
        "strategy": "fedavg",
        "device": "cpu",
        "num-server-rounds": 1,
        "local-epochs": 1,
        "torch-threads": 1,
        "server-torch-threads": 2,
        "results-dir": str(tmp_path),
        "run-name": "server",
    }
    run_inprocess(run_config, num_clients=2)
    summary = json.loads((tmp_path / "server" / "summary.json").read_text())
    assert summary["server_torch_threads"] == 2 and summary["torch_threads"] == 1
