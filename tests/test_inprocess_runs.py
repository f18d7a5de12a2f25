"""Whole runs in one process: accuracy reached, measured bpp, reproducibility, failing clients."""

from __future__ import annotations

import json

import numpy as np
from flwr.common import Context

from core.results import read_rounds
from fl_app.client_app import client_fn
from tools.inprocess import run_inprocess


def test_fedavg_digits_dirichlet_reaches_95_percent(tmp_path):
    """The foundation's acceptance run: 10 clients, Dirichlet 0.5, all participate, 20 rounds."""
    strategy = run_inprocess(
        {
            "strategy": "fedavg",
            "results-dir": str(tmp_path),
            "run-name": "fedavg",
            "device": "cpu",
            "num-server-rounds": 20,
            "partitioner": "dirichlet",
            "dirichlet-alpha": 0.5,
        },
        num_clients=10,
    )
    summary = json.loads((tmp_path / "fedavg" / "summary.json").read_text())
    assert summary["final_accuracy"] >= 0.95
    assert summary["completed"] and summary["num_clients"] == 10
    assert 32.0 <= summary["uplink_bpp"] <= 32.5 and 32.0 <= summary["downlink_bpp"] <= 32.5
    per_message = 4 * strategy.num_scalars + 128 * len(strategy.global_state)
    assert summary["uplink_bytes"] == summary["downlink_bytes"] == 20 * 10 * per_message
    rows = read_rounds(tmp_path / "fedavg" / "rounds.csv")
    assert len(rows) == 21 and rows[-1]["accuracy"] == summary["final_accuracy"]


def test_same_seed_same_run(tmp_path):
    config = {"device": "cpu", "num-server-rounds": 3, "fraction-fit": 0.6, "seed": 11}
    first = run_inprocess({**config, "results-dir": str(tmp_path / "a")}, num_clients=5)
    second = run_inprocess({**config, "results-dir": str(tmp_path / "b")}, num_clients=5)
    for a, b in zip(first.global_state, second.global_state, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [r["accuracy"] for r in first.history] == [r["accuracy"] for r in second.history]


def test_a_crashing_client_does_not_end_the_run(tmp_path):
    def flaky_client_fn(context: Context):
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("out of memory (simulated)")
        return client_fn(context)

    strategy = run_inprocess(
        {"device": "cpu", "num-server-rounds": 2, "results-dir": str(tmp_path)},
        num_clients=3,
        client_fn=flaky_client_fn,
    )
    assert [strategy.traffic[r].failures for r in (1, 2)] == [1, 1]
    assert strategy.history[-1]["clients"] == 2
    assert strategy.summary()["completed"]
