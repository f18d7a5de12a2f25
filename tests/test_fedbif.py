"""FedBiF: selectors, Eq. 6 aggregation, virtual bits, VBI state, wire bytes, ablation wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import Parameters, parameters_to_ndarrays

from clients.fedbif import STATE_KEY, FedBiFClient
from compression.fedbif_codec import UplinkMessage, gather_codes, spread_codes
from compression.packing import packed_size
from contracts.fedbif import mask_to_positions, select_active_bits
from fl_app.client_app import client_fn
from tests.helpers import build_test_strategy, fit_res, manager_with, npy_bytes
from tools.inprocess import make_contexts, run_inprocess

BASE = {
    "strategy": "fedbif",
    "device": "cpu",
    "min-available-clients": 1,
    "local-epochs": 1,
    "partitioner": "iid",
    # the raw wire formats; the lossless stages (default auto) have tests of their own
    "entropy": "none",
}


def strategy_for(tmp_path, **overrides):
    return build_test_strategy(BASE, tmp_path, **overrides)


# ------------------------------------------------------------------------------ selectors
@pytest.mark.parametrize(("bits", "active"), [(4, 1), (4, 2), (8, 2), (6, 3), (3, 3)])
def test_sequential_selector_covers_every_bit_within_m_over_s_rounds(bits, active):
    rounds = bits // active
    seen = [select_active_bits("sequential", r, bits, active, 0, 0) for r in range(1, rounds + 1)]
    assert sorted(p for window in seen for p in window) == list(range(bits))  # no overlap
    assert seen[0][-1] == bits - 1  # MSB first
    assert select_active_bits("sequential", rounds + 1, bits, active, 0, 0) == seen[0]


def test_fixed_and_random_selectors():
    assert select_active_bits("fixed", 7, 4, 1, 2, 0) == (2,)
    assert select_active_bits("fixed", 7, 4, 2, 2, 0) == (1, 2)
    draws = {select_active_bits("random", r, 8, 2, 0, seed=5) for r in range(1, 30)}
    assert len(draws) > 5 and all(len(d) == 2 and d[0] < d[1] for d in draws)
    assert select_active_bits("random", 3, 8, 2, 0, 5) == select_active_bits(
        "random", 3, 8, 2, 0, 5
    )
    with pytest.raises(ValueError, match="divisible"):
        select_active_bits("sequential", 1, 4, 3, 0, 0)


def test_bad_selector_setting_fails_at_start(tmp_path):
    with pytest.raises(ValueError, match="divisible"):
        strategy_for(tmp_path, **{"fedbif-active-bits": 3})


def test_spread_and_gather_codes_are_inverse():
    codes = np.arange(4, dtype=np.uint8)
    words = spread_codes(codes, (1, 3))
    assert words.tolist() == [0, 0b0010, 0b1000, 0b1010]
    np.testing.assert_array_equal(gather_codes(words, (1, 3)), codes)


# ------------------------------------------------------------------------------ aggregation
def test_eq6_aggregation_equals_recover_then_average(tmp_path):
    strategy = strategy_for(tmp_path)
    proxies = [p for p, _ in strategy.configure_fit(1, Parameters([], ""), manager_with(3))]
    sent = strategy.quantization(1)
    words, steps, positions = sent.words, sent.steps, sent.positions
    m, d = strategy.layout.bits, strategy.split.num_quantized
    rng = np.random.default_rng(0)
    uploads = [rng.integers(0, 2 ** len(positions), d, dtype=np.uint8) for _ in range(3)]
    # Positive: BatchNorm running variances among the extras are floored at 0 after aggregation.
    extras = [rng.uniform(0.1, 2.0, strategy.split.num_extras).astype(np.float16) for _ in range(3)]
    results = [
        (
            proxy,
            fit_res(
                strategy_encode(strategy, codes, ex), num_examples=10 * (k + 1), partition_id=k
            ),
        )
        for k, (proxy, codes, ex) in enumerate(zip(proxies, uploads, extras, strict=True))
    ]
    strategy.aggregate_fit(1, results, [])
    got = np.concatenate([strategy.global_state[i].reshape(-1) for i in strategy.q_index])

    # Eq. 6 literally: alpha * (mean_k sum_{i in S} 2^i b_ik + sum_{j not in S} 2^j b_j - 2^(m-1))
    alpha = np.repeat(steps.astype(np.float64), strategy.split.quantized_sizes)
    frozen = sum(
        ((words >> j) & 1).astype(np.float64) * 2**j for j in range(m) if j not in positions
    )
    active = np.mean(
        [
            sum(((codes >> k) & 1).astype(np.float64) * 2**p for k, p in enumerate(positions))
            for codes in uploads
        ],
        axis=0,
    )
    eq6 = alpha * (active + frozen - 2 ** (m - 1))
    np.testing.assert_allclose(got, eq6, rtol=0, atol=1e-6)

    # Recover every client's model, then average.
    models = [
        alpha
        * (
            spread_codes(codes, positions) | (words & ~np.uint8(sum(1 << p for p in positions)))
        ).astype(np.float64)
        - alpha * 2 ** (m - 1)
        for codes in uploads
    ]
    np.testing.assert_allclose(got, np.mean(models, axis=0), rtol=0, atol=1e-6)
    got_extras = np.concatenate([strategy.global_state[i].reshape(-1) for i in strategy.e_index])
    np.testing.assert_allclose(
        got_extras, np.mean([e.astype(np.float32) for e in extras], 0), atol=1e-6
    )


def test_float_server_model_adds_the_clients_mean_change_to_the_float_model(tmp_path):
    """fedbif-server-model=float: global' = global + alpha * mean_k(theta_k - theta_sent) on the
    quantized weights, so the downlink's rounding error never enters the server's model (with
    ``quantized``, Eq. 6, the mean of the clients' integers replaces it)."""
    strategy = strategy_for(tmp_path, **{"fedbif-server-model": "float"})
    proxies = [p for p, _ in strategy.configure_fit(1, Parameters([], ""), manager_with(3))]
    sent = strategy.quantization(1)
    before = np.concatenate([strategy.global_state[i].reshape(-1) for i in strategy.q_index])
    rng = np.random.default_rng(1)
    d, e = strategy.split.num_quantized, strategy.split.num_extras
    uploads = [rng.integers(0, 2, d, dtype=np.uint8) for _ in range(3)]
    extras = np.ones(e, np.float16)
    results = [
        (proxy, fit_res(strategy_encode(strategy, codes, extras), partition_id=k))
        for k, (proxy, codes) in enumerate(zip(proxies, uploads, strict=True))
    ]
    strategy.aggregate_fit(1, results, [])
    got = np.concatenate([strategy.global_state[i].reshape(-1) for i in strategy.q_index])
    alpha = np.repeat(sent.steps.astype(np.float64), strategy.split.quantized_sizes)
    received = strategy.layout.to_signed(torch.from_numpy(sent.words)).numpy().astype(np.float64)
    changes = [strategy.recover_integers(1, codes) - received for codes in uploads]
    want = before + alpha * np.mean(changes, axis=0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # a client that changed no bit leaves the float model exactly where it was
    strategy2 = strategy_for(tmp_path / "b", **{"fedbif-server-model": "float"})
    ((proxy, _),) = strategy2.configure_fit(1, Parameters([], ""), manager_with(1))
    sent2 = strategy2.quantization(1)
    unchanged = fedbif_codes_of(sent2.words, sent2.positions)
    before2 = [a.copy() for a in strategy2.global_state]
    strategy2.aggregate_fit(
        1, [(proxy, fit_res(strategy_encode(strategy2, unchanged, extras)))], []
    )
    for index in strategy2.q_index:
        np.testing.assert_allclose(strategy2.global_state[index], before2[index], atol=1e-6)


def fedbif_codes_of(words, positions):
    """The activated bits of ``words`` as an uplink sends them (what a client that flipped
    nothing returns)."""
    return gather_codes(words, positions)


@pytest.mark.parametrize(("ste", "power"), [("identity", 0), ("place", -1), ("chain", None)])
def test_ste_modes_scale_the_virtual_bit_gradient(tmp_path, ste, power):
    """identity: dL/dv = dL/dw; place: dL/dw / 2^p (a bit's push must match its place value);
    chain: dL/dw * alpha * 2^p. Checked on every activated position of a 2-bit window."""
    client, weights = backward_through_weights(
        tmp_path, **{"fedbif-active-bits": 2, "fedbif-ste": ste}
    )
    for key, virtual, step in zip(client.q_keys, client.virtual, client.steps, strict=True):
        for row, position in enumerate(client.positions):
            if power is None:
                factor = step * 2.0**position
            else:
                factor = 2.0 ** (power * position)
            torch.testing.assert_close(
                virtual.grad[row], weights[key].grad * factor, rtol=1e-5, atol=1e-12
            )


@pytest.mark.parametrize("scale", [0.1, 10.0])
def test_init_scale_multiplies_fresh_magnitudes(tmp_path, scale):
    """Fresh virtual bits are |N(0, 2/fan_in)| draws times fedbif-init-scale (same seed, same
    draws): the magnitudes scale exactly, the signs still follow the received bits."""
    _, ins = downlink_for(tmp_path)
    arrays = parameters_to_ndarrays(ins.parameters)
    magnitudes = []
    for value in (1.0, scale):
        context = make_contexts(
            {**BASE, "results-dir": str(tmp_path), "fedbif-init-scale": value}, 2
        )[0]
        client = make_client(context)
        client.load_downlink(arrays, ins.config)
        magnitudes.append([v.detach().abs() for v in client.virtual])
    for base, scaled in zip(*magnitudes, strict=True):
        # the floor keeps sign(v) meaningful; compare where neither draw hit it
        free = (base > 1e-3) & (scaled > 1e-3)
        torch.testing.assert_close(scaled[free], base[free] * scale, rtol=1e-5, atol=0)


def strategy_encode(strategy, codes, extras):
    return strategy.up.encode(UplinkMessage(codes, extras))


def test_examples_weighting_changes_weights(tmp_path):
    uniform = strategy_for(tmp_path / "u")
    weighted = strategy_for(tmp_path / "w", **{"fedbif-weighting": "examples"})
    updates = [type("U", (), {"num_examples": n})() for n in (10, 30)]
    np.testing.assert_allclose(uniform.client_weights(updates), [0.5, 0.5])
    np.testing.assert_allclose(weighted.client_weights(updates), [0.25, 0.75])


def test_malformed_uplinks_are_rejected(tmp_path):
    strategy = strategy_for(tmp_path)
    ((proxy, _),) = strategy.configure_fit(1, Parameters([], ""), manager_with(1))
    d, e = strategy.split.num_quantized, strategy.split.num_extras
    good_codes = np.zeros(packed_size(d, 1), dtype=np.uint8)
    bad = [
        [good_codes[:-1], np.zeros(e, np.float16)],
        [good_codes, np.zeros(e + 1, np.float16)],
        [good_codes, np.zeros(e, np.int16)],
        [good_codes],
        [good_codes.astype(np.int8), np.zeros(e, np.float16)],
    ]
    before = [a.copy() for a in strategy.global_state]
    strategy.aggregate_fit(1, [(proxy, fit_res(arrays)) for arrays in bad], [])
    assert strategy.traffic[1].rejected == len(bad)
    for got, want in zip(strategy.global_state, before, strict=True):
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------ client
def downlink_for(tmp_path, **overrides):
    strategy = strategy_for(tmp_path, **overrides)
    ((proxy, ins),) = strategy.configure_fit(1, Parameters([], ""), manager_with(1))
    return strategy, ins


def make_client(context) -> FedBiFClient:
    return client_fn(context).numpy_client  # type: ignore[attr-defined]


def backward_through_weights(tmp_path, **overrides):
    """A client that received round 1 and ran one backward pass through its rebuilt weights
    (their gradients kept): (client, weights)."""
    _, ins = downlink_for(tmp_path, **overrides)
    context = make_contexts({**BASE, "results-dir": str(tmp_path), **overrides}, 2)[0]
    client = make_client(context)
    client.load_downlink(parameters_to_ndarrays(ins.parameters), ins.config)
    weights = client.current_weights()
    for weight in weights.values():
        weight.retain_grad()
    images, labels = client.train_set.tensors
    logits = torch.func.functional_call(client.model, weights, (images[:16],), strict=False)
    torch.nn.functional.cross_entropy(logits, labels[:16]).backward()
    return client, weights


def test_virtual_bits_get_the_weight_gradient_and_frozen_bits_none(tmp_path):
    client, weights = backward_through_weights(tmp_path)
    for key, virtual, planes in zip(
        client.q_keys, client.virtual, client.frozen_planes, strict=True
    ):
        assert virtual.shape[0] == len(client.positions) == 1
        torch.testing.assert_close(virtual.grad[0], weights[key].grad, rtol=1e-6, atol=1e-12)
        assert not planes.requires_grad and planes.grad is None


def test_offset_fast_path_equals_full_recomposition_exactly(tmp_path):
    """Frozen bits summed once per round give bit-identical weights to rebuilding all m planes."""
    strategy, ins = downlink_for(tmp_path, **{"fedbif-active-bits": 2})
    context = make_contexts({**BASE, "results-dir": str(tmp_path), "fedbif-active-bits": 2}, 2)[0]
    client = make_client(context)
    client.load_downlink(parameters_to_ndarrays(ins.parameters), ins.config)
    with torch.no_grad():  # flip some virtual bits so trained and received bits differ
        for virtual in client.virtual:
            virtual[0].neg_()
    weights = client.current_weights()
    for key, planes, virtual, step in zip(
        client.q_keys, client.frozen_planes, client.virtual, client.steps, strict=True
    ):
        rows = list(planes.unbind(0))
        for row, position in enumerate(client.positions):
            rows[position] = (virtual[row] > 0).float()
        want = step * client.layout.value_from_bits(torch.stack(rows))
        assert torch.equal(weights[key].detach(), want)


def test_client_uplink_bytes_and_vbi_state(tmp_path):
    strategy, ins = downlink_for(tmp_path)
    context = make_contexts({**BASE, "results-dir": str(tmp_path)}, 2)[0]
    res = client_fn(context).fit(ins)
    d, e = strategy.split.num_quantized, strategy.split.num_extras
    arrays = parameters_to_ndarrays(res.parameters)
    # ceil(d * s / 8) code bytes + float16 extras + one .npy header per array
    payload = packed_size(d, 1) + 2 * e
    sent = sum(len(t) for t in res.parameters.tensors)
    assert sent == payload + sum(npy_bytes(a) - a.nbytes for a in arrays)
    assert sent == payload + 2 * 128

    # VBI state: float16 magnitudes of all m bits of every quantized weight.
    record = context.state[STATE_KEY]
    magnitudes = record["magnitudes"].numpy()
    assert magnitudes.dtype == np.float16 and magnitudes.size == strategy.layout.bits * d
    assert record.count_bytes() <= magnitudes.nbytes + 256

    # Next round: magnitudes inherited, signs from the received bits.
    strategy.aggregate_fit(1, [(manager_with(1).all()["1000"], res)], [])
    ((_, ins2),) = strategy.configure_fit(2, Parameters([], ""), manager_with(1))
    client = make_client(context)
    client.load_downlink(parameters_to_ndarrays(ins2.parameters), ins2.config)
    stored = magnitudes.astype(np.float32).reshape(strategy.layout.bits, -1)
    offset = 0
    for virtual, planes in zip(client.virtual, client.frozen_planes, strict=True):
        size = virtual[0].numel()
        for row, position in enumerate(client.positions):
            expected = np.maximum(stored[position, offset : offset + size], 1e-4)
            np.testing.assert_allclose(
                virtual[row].detach().abs().reshape(-1).numpy(), expected, rtol=1e-6
            )
            received = planes[position].reshape(-1).numpy()
            assert np.array_equal(virtual[row].detach().reshape(-1).numpy() > 0, received > 0)
        offset += size


def test_no_vbi_keeps_no_state(tmp_path):
    _, ins = downlink_for(tmp_path, **{"fedbif-vbi": False})
    context = make_contexts({**BASE, "results-dir": str(tmp_path), "fedbif-vbi": False}, 2)[0]
    client_fn(context).fit(ins)
    assert STATE_KEY not in context.state


def test_sign_bit_ablation_uses_sign_magnitude(tmp_path):
    strategy, ins = downlink_for(tmp_path, **{"fedbif-sign-bit": True})
    assert strategy.layout.kind == "sign-magnitude" and strategy.layout.scale_levels == 7
    # with the sequential selector the first round trains the MSB, i.e. the sign bit
    assert mask_to_positions(int(ins.config["fedbif-active-mask"]), 4) == (3,)
    context = make_contexts({**BASE, "results-dir": str(tmp_path), "fedbif-sign-bit": True}, 2)[0]
    res = client_fn(context).fit(ins)
    strategy.aggregate_fit(1, [(manager_with(1).all()["1000"], res)], [])
    assert all(np.all(np.isfinite(a)) for a in strategy.global_state)


def test_client_reproduces_received_model_before_training(tmp_path):
    float32 = {"fedbif-extras-dtype": "float32"}
    strategy, ins = downlink_for(tmp_path, **float32)
    context = make_contexts({**BASE, "results-dir": str(tmp_path), **float32}, 2)[0]
    client = make_client(context)
    client.load_downlink(parameters_to_ndarrays(ins.parameters), ins.config)
    rebuilt = client.current_weights()
    for key, index in zip(client.q_keys, strategy.q_index, strict=True):
        sent = torch.from_numpy(strategy.global_state[index])
        step = strategy.quantization(1).steps[strategy.q_index.index(index)]
        # the received weight is the global weight quantized: within one step of it
        assert torch.all((rebuilt[key].detach() - sent).abs() <= step * 1.0001)


# ------------------------------------------------------------------------------ runs
def test_fedbif_short_run_measures_about_1_and_4_bpp(tmp_path):
    strategy = run_inprocess(
        {**BASE, "results-dir": str(tmp_path), "run-name": "fb", "num-server-rounds": 3},
        num_clients=4,
    )
    summary = strategy.summary()
    assert 1.0 < summary["uplink_bpp"] < 1.2 and 4.0 < summary["downlink_bpp"] < 4.2
    rows = (tmp_path / "fb" / "rounds.csv").read_text().splitlines()
    assert rows[0].endswith("sparsity,active_bits,full_downlinks") and len(rows) == 5
    assert strategy.history[-1]["accuracy"] > 0.3
    assert 0.0 <= strategy.history[-1]["sparsity"] < 1.0


def test_fedbif_lr_key_reaches_the_optimizer(tmp_path):
    _, ins = downlink_for(tmp_path)
    context = make_contexts({**BASE, "results-dir": str(tmp_path), "fedbif-lr": 0.7}, 2)[0]
    client = make_client(context)
    client.load_downlink(parameters_to_ndarrays(ins.parameters), ins.config)
    optimizer = client.make_optimizer()
    assert optimizer.param_groups[0]["lr"] == 0.7
    assert optimizer.param_groups[0]["params"] == client.virtual


def test_downlink_decodes_to_what_the_server_quantized(tmp_path):
    strategy, ins = downlink_for(tmp_path)
    arrays = parameters_to_ndarrays(ins.parameters)
    assert len(arrays) == 3 and arrays[0].dtype == np.uint8
    assert arrays[0].size == packed_size(strategy.split.num_quantized, 4)
    message = strategy.down.decode(arrays)
    np.testing.assert_array_equal(message.words, strategy.quantization(1).words)
    np.testing.assert_array_equal(message.steps, strategy.quantization(1).steps)
    assert message.extras.size == strategy.split.num_extras and ins.config["server-round"] == 1


@pytest.mark.slow
def test_fedbif_1_4_is_within_one_point_of_fedavg_on_digits(tmp_path):
    """Acceptance: digits, Dirichlet 0.5, 10 clients all participating, 30 rounds, same seed,
    each method at its defaults. FedBiF sends ~1 bpp up and ~4 bpp down."""
    common = {"device": "cpu", "num-server-rounds": 30, "results-dir": str(tmp_path)}
    fedavg = run_inprocess({**common, "strategy": "fedavg"}, num_clients=10)
    fedbif = run_inprocess({**common, "strategy": "fedbif"}, num_clients=10)
    fedavg_acc = fedavg.history[-1]["accuracy"]
    fedbif_acc = fedbif.history[-1]["accuracy"]
    assert fedbif_acc >= fedavg_acc - 0.01, (fedbif_acc, fedavg_acc)
    summary = fedbif.summary()
    assert summary["uplink_bpp"] < 1.2 and summary["downlink_bpp"] < 4.2
