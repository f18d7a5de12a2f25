"""The base training client: local SGD that learns, is deterministic, and reports what it sent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import Code, FitIns, ndarrays_to_parameters, parameters_to_ndarrays

from core.torch_utils import select_device
from fl_app.client_app import client_fn
from tools.inprocess import make_contexts

RUN_CONFIG = {
    "strategy": "fedavg",
    "device": "cpu",
    "local-epochs": 2,
    "partitioner": "iid",
    "seed": 3,
}


def initial_state():
    from fl_app.methods import load_config
    from fl_app.server_app import build_strategy

    return build_strategy(load_config(RUN_CONFIG)[0]).global_state


def fit_once(context, state, server_round=1):
    ins = FitIns(ndarrays_to_parameters(state), {"server-round": server_round})
    res = client_fn(context).fit(ins)
    assert res.status.code == Code.OK
    return res, parameters_to_ndarrays(res.parameters)


def test_fit_trains_and_reports():
    context = make_contexts(RUN_CONFIG, 5)[2]
    state = initial_state()
    res, arrays = fit_once(context, state)
    assert [a.shape for a in arrays] == [a.shape for a in state]
    assert all(a.dtype == np.float32 for a in arrays)
    assert res.metrics["partition-id"] == 2
    assert res.num_examples > 0
    assert any(not np.array_equal(a, b) for a, b in zip(arrays, state, strict=True))
    # A second round from the trained weights starts from a lower loss than the first did.
    res2, _ = fit_once(context, arrays, server_round=2)
    assert res2.metrics["train-loss"] < res.metrics["train-loss"]


def test_fit_is_deterministic_for_a_seed_and_round():
    state = initial_state()
    _, first = fit_once(make_contexts(RUN_CONFIG, 5)[1], state)
    _, again = fit_once(make_contexts(RUN_CONFIG, 5)[1], state)
    _, other_round = fit_once(make_contexts(RUN_CONFIG, 5)[1], state, server_round=2)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other_round, strict=True))


def test_device_selection():
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            select_device("cuda")


def test_missing_partition_id_in_node_config_is_explained():
    context = make_contexts(RUN_CONFIG, 2)[0]
    context.node_config = {}
    with pytest.raises(ValueError, match="partition-id"):
        client_fn(context)
