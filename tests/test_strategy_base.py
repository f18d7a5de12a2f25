"""The strategy base's own machinery: the per-round memo, declared round columns, the trust
boundary's wrapping of method errors."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Parameters

from strategies.base import PayloadError, RoundMemo
from tests.helpers import build_test_strategy, fit_res, manager_with


def test_round_memo_builds_once_per_round_and_forgets_old_rounds():
    memo, calls = RoundMemo(), []

    def build(tag: str) -> str:
        calls.append(tag)
        return tag

    assert memo.get(1, "a", lambda: build("1a")) == "1a"
    assert memo.get(1, "a", lambda: build("again")) == "1a"
    assert memo.get(1, "b", lambda: build("1b")) == "1b"
    assert memo.get(2, "a", lambda: build("2a")) == "2a"
    assert memo.get(1, "a", lambda: build("1a'")) == "1a'"  # round 1 was dropped
    assert calls == ["1a", "1b", "2a", "1a'"]


def test_a_shared_downlink_is_serialized_once_per_round(tmp_path):
    strategy = build_test_strategy({"strategy": "fedbif", "device": "cpu"}, tmp_path)
    instructions = strategy.configure_fit(1, Parameters([], ""), manager_with(3))
    payloads = {id(ins.parameters) for _, ins in instructions}
    assert len(payloads) == 1  # one Parameters object for the three clients
    sent = sum(len(t) for t in instructions[0][1].parameters.tensors)
    assert strategy.traffic[1].downlink_bytes == 3 * sent  # but every client's bytes count


def test_round_columns_are_declared_and_filled(tmp_path):
    strategy = build_test_strategy({"strategy": "fedbat", "device": "cpu"}, tmp_path)
    assert np.isnan(strategy.round_row(0, 1.0, 0.1)["mean_alpha"])
    strategy.record_metrics(3, mean_alpha=0.5)
    assert strategy.round_row(3, 1.0, 0.1)["mean_alpha"] == 0.5
    with pytest.raises(KeyError, match="undeclared"):
        strategy.record_metrics(3, not_a_column=1.0)


def test_any_method_error_becomes_a_rejection_naming_the_uplink(tmp_path):
    base = {"strategy": "fedbif", "device": "cpu", "min-available-clients": 1, "entropy": "none"}
    strategy = build_test_strategy(base, tmp_path)
    strategy.configure_fit(1, Parameters([], ""), manager_with(1))
    with pytest.raises(PayloadError, match=r"^FedBiF uplink: FedBiF uplink has 2 arrays, got 1"):
        strategy.decode_uplink(1, "1000", fit_res([np.zeros(3, np.uint8)]))
