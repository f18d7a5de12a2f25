"""FedBAT: binarizer forward/backward, step size, warm-up switch, exact rebuild, bytes, a run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.common import Parameters, parameters_to_ndarrays

from clients.fedbat import FedBATClient, warmup_steps
from compression.binarize import (
    StochasticBinarize,
    binarize_to_codes,
    codes_to_values,
    learnable_step,
    stochastic_binarize,
)
from compression.fedbat_codec import rebuild_update
from compression.packing import packed_size
from fl_app.client_app import client_fn
from strategies.base import PayloadError
from tests.helpers import build_test_strategy, delta_part, fit_res, manager_with, npy_bytes
from tools.inprocess import make_contexts, run_inprocess

BASE = {
    "strategy": "fedbat",
    "device": "cpu",
    "min-available-clients": 1,
    "local-epochs": 1,
    "partitioner": "iid",
}


def strategy_for(tmp_path, **overrides):
    return build_test_strategy(BASE, tmp_path, **overrides)


# ------------------------------------------------------------------------------ operator
def test_forward_is_unbiased_inside_and_the_sign_outside():
    alpha = torch.tensor(0.02)
    x = torch.tensor([-0.02, -0.015, -0.007, -0.001, 0.0, 0.003, 0.011, 0.0199, 0.02])
    draws = 20_000
    generator = torch.Generator().manual_seed(1)
    outputs = torch.stack(
        [stochastic_binarize(x, alpha, generator=generator) for _ in range(draws)]
    )
    assert set(outputs.unique().tolist()) <= {-float(alpha), float(alpha)}
    sigma = torch.sqrt(torch.clamp(alpha**2 - x**2, min=0.0)) / math.sqrt(draws)
    error = (outputs.mean(0) - x).abs()
    assert torch.all(error <= 3 * sigma + 1e-7), (error / sigma.clamp_min(1e-12)).tolist()
    outside = torch.tensor([-0.5, -0.021, 0.03, 7.0])
    torch.testing.assert_close(
        stochastic_binarize(outside, alpha, generator=generator), alpha * torch.sign(outside)
    )


def test_backward_matches_the_designed_derivatives():
    generator = torch.Generator().manual_seed(2)
    x = (torch.randn(500, generator=generator) * 0.03).requires_grad_()
    alpha = torch.tensor(0.02, requires_grad=True)
    noise = torch.rand(500, generator=generator)
    upstream = torch.randn(500, generator=generator)
    (StochasticBinarize.apply(x, alpha, noise) * upstream).sum().backward()

    s = (x / alpha).detach()
    b = torch.clamp(torch.floor((s + 1) / 2 + noise), 0, 1)
    inside = (s.abs() <= 1).float()
    assert 0 < inside.sum() < 500  # both regions are exercised
    torch.testing.assert_close(x.grad, upstream * inside)
    local = (s > 1).float() - (s < -1).float() + inside * (2 * b - 1 - s)
    torch.testing.assert_close(alpha.grad, (upstream * local).sum())


def test_step_size_chain_rule_and_clamp():
    grad_alpha = 0.7  # pretend dL/da
    a_e = torch.tensor(0.05, requires_grad=True)
    alpha = learnable_step(0.01, a_e, 6.0, 5e-4, 5e-2)
    torch.testing.assert_close(alpha, torch.tensor(0.01 * math.exp(0.3)))
    (alpha * grad_alpha).backward()
    torch.testing.assert_close(a_e.grad, grad_alpha * 6.0 * alpha.detach())
    clamped = torch.tensor(1.0, requires_grad=True)
    high = learnable_step(0.01, clamped, 6.0, 5e-4, 5e-2)
    high.backward()
    assert float(high.detach()) == pytest.approx(5e-2) and float(clamped.grad) == 0.0
    assert float(learnable_step(0.0, torch.tensor(0.0), 6.0, 5e-4, 5e-2)) == pytest.approx(5e-4)


def test_mean_designed_gradient_equals_finite_difference_of_the_expected_output():
    """Stratified noise U = (k + 0.5) / N makes the mean over k an accurate quadrature of E[y]."""
    n = 100_000
    noise = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).unsqueeze(1)
    x0 = torch.tensor([-0.05, -0.012, -0.004, 0.006, 0.015, 0.04], dtype=torch.float64)
    a0 = torch.tensor(0.02, dtype=torch.float64)

    def expected(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return StochasticBinarize.apply(x.expand(n, -1), a, noise).mean(0)

    h = 1e-4
    fd_alpha = (expected(x0, a0 + h) - expected(x0, a0 - h)) / (2 * h)
    fd_x = torch.stack(
        [
            (expected(x0 + h * e, a0) - expected(x0 - h * e, a0))[i] / (2 * h)
            for i, e in enumerate(torch.eye(len(x0), dtype=torch.float64))
        ]
    )
    for i in range(len(x0)):
        x = x0.clone().requires_grad_()
        a = a0.clone().requires_grad_()
        expected(x, a)[i].backward()
        assert float(a.grad) == pytest.approx(float(fd_alpha[i]), abs=2e-3)
        assert float(x.grad[i]) == pytest.approx(float(fd_x[i]), abs=2e-3)
    # the expectation is clamp(x, -a, a): slope 1 in x inside, +-1 in a outside
    torch.testing.assert_close(fd_x, (x0.abs() < a0).double(), atol=2e-3, rtol=0)
    torch.testing.assert_close(fd_alpha, torch.sign(x0) * (x0.abs() > a0), atol=2e-3, rtol=0)


def test_codes_and_values_round_trip():
    x = torch.tensor([-0.3, -0.01, 0.0, 0.01, 0.3])
    noise = torch.tensor([0.1, 0.9, 0.49, 0.2, 0.0])
    codes = binarize_to_codes(x, 0.02, noise)
    assert codes.tolist() == [0, 1, 0, 0, 1]
    forward = StochasticBinarize.apply(x, torch.tensor(0.02), noise)
    torch.testing.assert_close(codes_to_values(codes, 0.02), forward, rtol=0, atol=0)


def test_warmup_steps():
    assert warmup_steps(10, 0.5) == 5
    assert warmup_steps(7, 0.5, "ceil") == 4
    assert warmup_steps(10, 0.0) == 0
    assert warmup_steps(10, 1.0) == 10
    assert warmup_steps(10, 0.3) == 3


@pytest.mark.parametrize(("total", "floor", "ceil"), [(7, 3, 4), (14, 7, 7), (9, 4, 5)])
def test_warmup_floors_like_the_authors_code(total, floor, ceil):
    """The authors binarize once ``iter > phi * T`` (iter = 1, 2, ...): their warm-up steps are
    the iterations with iter <= phi * T."""
    authors = sum(1 for it in range(1, total + 1) if not it > 0.5 * total)
    assert warmup_steps(total, 0.5) == authors == floor
    assert warmup_steps(total, 0.5, "ceil") == ceil


# ------------------------------------------------------------------------------ client
def make_client(tmp_path, **overrides) -> FedBATClient:
    context = make_contexts({**BASE, "results-dir": str(tmp_path), **overrides}, 3)[0]
    return client_fn(context).numpy_client  # type: ignore[attr-defined]


def downlink(strategy):
    ((_, ins),) = strategy.configure_fit(1, Parameters([], ""), manager_with(1))
    return ins


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.5, 1.0])
def test_warmup_switch_happens_at_the_configured_step(tmp_path, phi):
    strategy = strategy_for(tmp_path, **{"fedbat-warmup": phi})
    ins = downlink(strategy)
    client = make_client(tmp_path, **{"fedbat-warmup": phi})
    modes: list[bool] = []
    original = client.current_weights

    def spy(binarize: bool) -> dict[str, torch.Tensor]:
        modes.append(binarize)
        return original(binarize)

    client.current_weights = spy  # type: ignore[method-assign]
    client.fit(parameters_to_ndarrays(ins.parameters), ins.config)
    total = len(modes)
    switch = warmup_steps(total, phi)
    assert modes == [False] * switch + [True] * (total - switch)
    assert client.switch_step == (switch if switch < total else -1)
    # a0 is mean|u| at the switch; step sizes stay inside the clamp range
    assert all(np.float32(5e-4) <= a <= np.float32(5e-2) for a in client.sent_alphas)
    if 0 < phi < 1:
        assert all(a0 > 0 for a0 in client.alpha0)
        assert any(a_e.grad is not None for a_e in client.alpha_e)  # a_e was trained


def test_server_rebuild_equals_the_clients_binarized_update(tmp_path):
    strategy = strategy_for(tmp_path)
    ins = downlink(strategy)
    client = make_client(tmp_path)
    arrays, num_examples, metrics = client.fit(parameters_to_ndarrays(ins.parameters), ins.config)
    update = strategy.decode_uplink(1, "0", fit_res(arrays, num_examples, **metrics))
    sent = torch.cat([t.reshape(-1) for t in client.binarized]).numpy()
    np.testing.assert_array_equal(delta_part(strategy, update, strategy.b_index), sent)
    for values, alpha in zip(client.binarized, client.sent_alphas, strict=True):
        assert set(np.unique(np.abs(values.numpy())).tolist()) == {np.float32(alpha)}
    new_state = strategy.aggregate(1, [update])
    for k, index in enumerate(strategy.b_index):
        np.testing.assert_array_equal(
            new_state[index], strategy.global_state[index] + client.binarized[k].numpy()
        )
    # the client's module holds exactly the model the server now has for this client
    state = client.model.state_dict()
    for key, index in zip(client.b_keys, strategy.b_index, strict=True):
        np.testing.assert_array_equal(state[key].numpy(), new_state[index])


def test_uplink_bytes_breakdown(tmp_path):
    strategy = strategy_for(tmp_path)
    ins = downlink(strategy)
    res = client_fn(make_contexts({**BASE, "results-dir": str(tmp_path)}, 3)[0]).fit(ins)
    arrays = parameters_to_ndarrays(res.parameters)
    split = strategy.split
    assert [a.dtype for a in arrays] == [np.uint8, np.float32, np.float16]
    assert arrays[0].nbytes == packed_size(split.num_quantized, 1) == -(-split.num_quantized // 8)
    assert arrays[1].nbytes == 4 * len(split.quantized_shapes)
    assert arrays[2].nbytes == 2 * split.num_extras
    sent = sum(len(t) for t in res.parameters.tensors)
    assert sent == sum(npy_bytes(a) for a in arrays)
    assert sent - sum(a.nbytes for a in arrays) <= 3 * 128


def test_weighted_aggregation_of_updates_and_extras(tmp_path):
    strategy = strategy_for(tmp_path)
    split = strategy.split
    rng = np.random.default_rng(0)
    payloads, rebuilt = [], []
    for _ in range(2):
        bits = rng.integers(0, 2, split.num_quantized, dtype=np.uint8)
        alphas = rng.uniform(1e-3, 1e-2, len(split.quantized_shapes)).astype(np.float32)
        # Positive: BatchNorm running variances among them are floored at 0 after aggregation.
        extras = rng.uniform(0.1, 2.0, split.num_extras).astype(np.float16)
        payloads.append((np.packbits(bits, bitorder="little"), alphas, extras))
        rebuilt.append(rebuild_update(bits, alphas, split.quantized_sizes).astype(np.float64))
    before = np.concatenate([strategy.global_state[i].reshape(-1) for i in strategy.b_index])
    proxies = [p for p, _ in strategy.configure_fit(1, Parameters([], ""), manager_with(2))]
    results = [
        (proxy, fit_res(list(arrays), num_examples=n, partition_id=k))
        for k, (proxy, arrays, n) in enumerate(zip(proxies, payloads, (10, 30), strict=True))
    ]
    strategy.aggregate_fit(1, results, [])
    got = np.concatenate([strategy.global_state[i].reshape(-1) for i in strategy.b_index])
    np.testing.assert_allclose(got, before + 0.25 * rebuilt[0] + 0.75 * rebuilt[1], atol=1e-7)
    got_extras = np.concatenate([strategy.global_state[i].reshape(-1) for i in strategy.e_index])
    want = 0.25 * payloads[0][2].astype(np.float64) + 0.75 * payloads[1][2].astype(np.float64)
    np.testing.assert_allclose(got_extras, want, atol=1e-6)
    assert strategy.round_metrics[1]["mean_alpha"] == pytest.approx(
        np.mean(np.concatenate([payloads[0][1], payloads[1][1]]))
    )


def test_malformed_uplinks_raise_payload_error(tmp_path):
    strategy = strategy_for(tmp_path)
    split = strategy.split
    d, n_layers, e = split.num_quantized, len(split.quantized_shapes), split.num_extras
    codes = np.zeros(packed_size(d, 1), np.uint8)
    alphas = np.full(n_layers, 0.01, np.float32)
    extras = np.zeros(e, np.float16)
    bad = {
        "3 arrays": [codes, alphas],
        "bytes": [codes[:-1], alphas, extras],
        "alphas": [codes, alphas[:-1], extras],
        "float32": [codes, alphas.astype(np.float64), extras],
        "positive": [codes, -alphas, extras],
        "NaN": [codes, alphas, np.full(e, np.nan, np.float16)],
        "extras must be float16, got int16": [codes, alphas, np.zeros(e, np.int16)],
        "extras must be float16, got float32": [codes, alphas, np.zeros(e, np.float32)],
    }
    for reason, arrays in bad.items():
        with pytest.raises(PayloadError, match=reason):
            strategy.decode_uplink(1, "0", fit_res(arrays))
    garbage = Parameters(tensors=[b"not npy", b"", b"x"], tensor_type="numpy.ndarray")
    with pytest.raises(PayloadError, match="FedBAT uplink"):
        strategy.decode_uplink(1, "0", fit_res(garbage))
    strategy.decode_uplink(1, "0", fit_res([codes, alphas, extras]))  # the good one passes


def test_clamp_range_must_be_ordered(tmp_path):
    with pytest.raises(ValueError, match="fedbat-alpha-min"):
        strategy_for(tmp_path, **{"fedbat-alpha-min": 0.1, "fedbat-alpha-max": 0.05})


# ------------------------------------------------------------------------------ a short run
def test_short_inprocess_run_learns_at_about_one_bpp_uplink(tmp_path):
    strategy = run_inprocess(
        {
            **BASE,
            "results-dir": str(tmp_path),
            "num-server-rounds": 4,
            "partitioner": "dirichlet",
        },
        num_clients=4,
    )
    rows = strategy.history
    assert rows[-1]["accuracy"] > 0.8 > rows[0]["accuracy"]
    assert all(r["rejected"] == 0 and r["failures"] == 0 for r in rows[1:])
    # d bits + 16-bit extras + alphas + headers over the wire-state scalars, measured
    assert 1.0 < rows[-1]["uplink_bpp"] < 1.3
    assert rows[-1]["downlink_bpp"] > 32.0
    assert all(np.float32(5e-4) <= r["mean_alpha"] <= np.float32(5e-2) for r in rows[1:])


def test_rho_zero_keeps_the_step_size_at_its_start(tmp_path):
    """rho = 0 (the authors' ablation): a = clamp(a0 * exp(0)) does not move with a_e."""
    strategy = strategy_for(tmp_path, **{"fedbat-rho": 0.0})
    ins = downlink(strategy)
    client = make_client(tmp_path, **{"fedbat-rho": 0.0})
    client.fit(parameters_to_ndarrays(ins.parameters), ins.config)
    assert client.alpha0 is not None
    expected = [
        float(np.clip(np.float32(a0), np.float32(5e-4), np.float32(5e-2))) for a0 in client.alpha0
    ]
    np.testing.assert_allclose(client.sent_alphas, expected, rtol=1e-6)
