"""``torch-threads`` pins torch's CPU thread count in server and clients, and the run records it."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.common import Context

from core.config import ConfigError
from core.torch_utils import apply_thread_count
from fl_app.client_app import client_fn
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


def test_pinned_run_trains_and_reports_at_the_pinned_count(tmp_path, restore_threads):
    """With ``torch-threads=1`` every client fit runs at 1 thread, even where its process was at
    2 when the message came (reset here, after the server had pinned it), and ``summary.json``
    records the count."""
    torch.set_num_threads(2)
    seen: list[int] = []

    def recording(context: Context):
        torch.set_num_threads(2)  # as a fresh worker process would be
        client = client_fn(context)
        original_fit = client.fit

        def fit(ins):
            seen.append(torch.get_num_threads())
            return original_fit(ins)

        client.fit = fit
        return client

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
