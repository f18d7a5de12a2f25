"""Post-training compression baselines: codecs (round trips, bytes, unbiasedness), majority vote,
EF residual, FedDQ widths, DAdaQuant levels, SignSGD's 1-bit downlink, bad payloads, runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import Context, RecordDict, ndarrays_to_parameters
from torch.utils.data import TensorDataset

from clients.update_compression import EF_STATE_KEY, SIGNSGD_STATE_KEY, EFSignSGDClient
from compression.layout import split_flat
from compression.packing import packed_size
from compression.sign_codec import (
    ScaledSignCodec,
    ScaledSignMessage,
    apply_sign_step,
    majority_vote,
    pack_signs,
    scaled_sign,
    scaled_sign_values,
    unpack_signs,
)
from compression.update_quantizers import (
    FixedStepCodec,
    QSGDCodec,
    SymmetricCodec,
    dequantize_fixed_step,
    dequantize_qsgd,
    dequantize_symmetric,
    fixed_step_width,
    quantize_fixed_step,
    quantize_qsgd,
    quantize_symmetric,
    symmetric_bits,
)
from core.wire_state import wire_keys
from fl_app.methods import METHODS, load_config
from fl_app.models import build_model
from fl_app.server_app import build_strategy
from strategies.base import PayloadError
from strategies.dadaquant import PlateauDoubler, client_levels
from tests.helpers import fit_res, npy_bytes
from tools.inprocess import make_contexts, run_inprocess

METHOD_NAMES = ("signsgd", "ef-signsgd", "fedpaq", "qsgd", "feddq", "dadaquant")
SIZES = [300, 7, 1, 500]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.01, sum(SIZES)).astype(np.float32)


def assert_unbiased(x: np.ndarray, draws: np.ndarray, variance: np.ndarray) -> None:
    """Mean of N draws within 3 sigma of x, summed over scalars (one z-score), and no single
    scalar beyond 5 sigma (P < 1e-6 each); sigma from the rounding variance f(1 - f) step^2."""
    n = draws.shape[0]
    error = draws.astype(np.float64).mean(axis=0) - x
    sigma_total = np.sqrt(variance.sum() / n)
    assert abs(error.sum()) <= 3 * sigma_total
    sigma = np.sqrt(variance / n)
    varying = sigma > 0
    assert np.all(np.abs(error[varying]) <= 5 * sigma[varying] + 1e-9)
    assert np.allclose(error[~varying], 0, atol=1e-9)


def rounding_variance(x: np.ndarray, step: np.ndarray) -> np.ndarray:
    frac = (x / step) - np.floor(x / step)
    return step**2 * frac * (1 - frac)


# ------------------------------------------------------------------ the client and server paths
# A client quantizes and encodes with the codec; the server decodes (validating) and dequantizes.
def encode_symmetric(flat, sizes, levels, generator):
    message = quantize_symmetric(flat, sizes, levels, generator)
    return tuple(SymmetricCodec(tuple(sizes), levels).encode(message))


def decode_symmetric(packed, steps, sizes, levels):
    message = SymmetricCodec(tuple(sizes), levels).decode([packed, steps])
    return dequantize_symmetric(message, sizes)


def encode_qsgd(flat, levels, bucket, generator):
    message = quantize_qsgd(flat, levels, bucket, generator)
    return tuple(QSGDCodec(np.asarray(flat).size, levels, bucket).encode(message))


def decode_qsgd(signs, magnitudes, norms, count, levels, bucket):
    message = QSGDCodec(count, levels, bucket).decode([signs, magnitudes, norms])
    return dequantize_qsgd(message, levels, bucket)


def encode_fixed_step(flat, sizes, step, generator):
    message = quantize_fixed_step(flat, sizes, step, generator)
    return tuple(FixedStepCodec(tuple(sizes)).encode(message))


def decode_fixed_step(stream, params, widths, sizes):
    message = FixedStepCodec(tuple(sizes)).decode([stream, params, widths])
    return dequantize_fixed_step(message, sizes)


def encode_scaled_sign(flat, sizes):
    signs, scales = scaled_sign(flat, sizes)
    packed, scales, _ = ScaledSignCodec(tuple(sizes), 0).encode(
        ScaledSignMessage(signs, scales, np.zeros(0, np.float16))
    )
    return packed, scales


def decode_scaled_sign(packed, scales, sizes):
    codec = ScaledSignCodec(tuple(sizes), 0)
    message = codec.decode([packed, scales, np.zeros(0, np.float16)])
    return scaled_sign_values(message.signs, message.scales, sizes)


# ------------------------------------------------------------------ symmetric (FedPAQ, DAdaQuant)
@pytest.mark.parametrize(("levels", "bits"), [(1, 2), (2, 3), (7, 4), (127, 8)])
def test_symmetric_round_trip_on_the_grid_and_bytes(levels, bits):
    assert symmetric_bits(levels) == bits
    rng = np.random.default_rng(levels)
    steps = np.float32([0.01, 0.5, 2.0, 0.125])
    codes = [rng.integers(-levels, levels + 1, n) for n in SIZES]
    for c in codes:
        c[0] = levels  # the peak sets the step
    flat = np.concatenate([c * s for c, s in zip(codes, steps, strict=True)]).astype(np.float32)
    packed, got_steps = encode_symmetric(flat, SIZES, levels, gen())
    assert packed.dtype == np.uint8 and packed.size == packed_size(sum(SIZES), bits)
    assert np.array_equal(got_steps, steps)
    assert np.array_equal(decode_symmetric(packed, got_steps, SIZES, levels), flat)
    assert npy_bytes(packed) == packed.size + 128


def test_fedpaq_quantizer_is_unbiased():
    x = sample()
    levels = 7  # 4 bits
    draws = np.stack(
        [
            decode_symmetric(*encode_symmetric(x, SIZES, levels, gen(i)), SIZES, levels)
            for i in range(400)
        ]
    )
    step = np.repeat(encode_symmetric(x, SIZES, levels, gen())[1], SIZES).astype(np.float64)
    assert_unbiased(x, draws, rounding_variance(x.astype(np.float64), step))


def test_all_zero_tensor_and_bad_payloads():
    flat = np.zeros(sum(SIZES), dtype=np.float32)
    packed, steps = encode_symmetric(flat, SIZES, 7, gen())
    assert np.array_equal(decode_symmetric(packed, steps, SIZES, 7), flat)
    with pytest.raises(ValueError):
        decode_symmetric(packed[:-1], steps, SIZES, 7)
    with pytest.raises(ValueError):
        decode_symmetric(packed, steps.astype(np.float64), SIZES, 7)
    with pytest.raises(ValueError):
        decode_symmetric(packed, -steps, SIZES, 7)
    with pytest.raises(ValueError):  # code 15 > 2 * 7 is not a valid 4-bit symmetric code
        decode_symmetric(np.full_like(packed, 0xFF), steps, SIZES, 7)


# ------------------------------------------------------------------ QSGD
def test_qsgd_round_trip_bytes_and_unbiasedness():
    x = sample(3)
    levels, bucket = 15, 64
    signs, mags, norms = encode_qsgd(x, levels, bucket, gen())
    d = x.size
    assert signs.size == packed_size(d, 1) and mags.size == packed_size(d, 4)
    assert norms.dtype == np.float32 and norms.size == -(-d // bucket)
    padded = np.zeros(norms.size * bucket, dtype=np.float64)
    padded[:d] = x
    assert np.allclose(norms, np.linalg.norm(padded.reshape(-1, bucket), axis=1), rtol=1e-6)
    decoded = decode_qsgd(signs, mags, norms, d, levels, bucket)
    unit = np.repeat(norms.astype(np.float64) / levels, bucket)[:d]
    # Every decoded value is a multiple of norm / s, within one level of x, with x's sign.
    assert np.allclose(decoded / unit, np.rint(decoded / unit), atol=1e-4)
    assert np.all(np.abs(decoded - x) <= unit * (1 + 1e-5))
    assert np.all((decoded == 0) | (np.sign(decoded) == np.sign(x)))
    draws = np.stack(
        [
            decode_qsgd(*encode_qsgd(x, levels, bucket, gen(i)), d, levels, bucket)
            for i in range(400)
        ]
    )
    assert_unbiased(x, draws, rounding_variance(np.abs(x).astype(np.float64), unit))


# ------------------------------------------------------------------ FedDQ
def test_fixed_step_width_covers_the_range():
    assert fixed_step_width(0.0, 0.01) == 0
    assert fixed_step_width(0.01, 0.01) == 1  # codes 0..1
    assert fixed_step_width(0.03, 0.01) == 2  # codes 0..3
    assert fixed_step_width(0.031, 0.01) == 3  # codes 0..4
    assert fixed_step_width(2.55, 0.01) == 8


def test_feddq_round_trip_bytes_and_width_falls_with_the_range():
    step = np.float32(0.01)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 31, sum(SIZES))
    flat = (-0.1 + codes * step).astype(np.float32)
    stream, params, widths = encode_fixed_step(flat, SIZES, float(step), gen())
    decoded = decode_fixed_step(stream, params, widths, SIZES)
    assert np.allclose(decoded, flat, atol=1e-6)
    assert stream.size == sum(
        packed_size(n, int(k)) if k else 0 for n, k in zip(SIZES, widths, strict=True)
    )
    assert widths[0] == 5 and widths[2] == 0  # a 1-scalar tensor has zero range
    shrunk = flat * np.float32(0.1)
    _, _, small = encode_fixed_step(shrunk, SIZES, float(step), gen())
    assert np.all(small <= widths) and small[0] <= 3 and small[0] < widths[0]
    # A range needing more than 8 bits keeps 8 bits with a larger step.
    _, wide_params, wide = encode_fixed_step(flat * 100, SIZES, float(step), gen())
    assert wide[0] == 8 and wide_params[0, 1] > step


def test_feddq_quantizer_is_unbiased():
    x = sample(5)
    step = 0.004
    draws = np.stack(
        [decode_fixed_step(*encode_fixed_step(x, SIZES, step, gen(i)), SIZES) for i in range(400)]
    )
    _, params, _ = encode_fixed_step(x, SIZES, step, gen())
    low = np.repeat(params[:, 0], SIZES).astype(np.float64)
    assert_unbiased(
        x, draws, rounding_variance(x - low, np.full(x.size, np.float32(step), np.float64))
    )


# ------------------------------------------------------------------ signs
def test_sign_packing_and_majority_vote_by_hand():
    values = np.array([0.5, -1.0, 0.0, -0.0, 3.0, -2.0, 1e-9, -1e-9, 7.0], dtype=np.float32)
    packed = pack_signs(values)
    assert packed.size == 2
    assert np.array_equal(unpack_signs(packed, 9), [1, -1, 1, 1, 1, -1, 1, -1, 1])
    votes = np.array(
        [
            [1, 1, -1, -1, 1],
            [1, -1, -1, 1, 1],
            [-1, 1, -1, -1, -1],
            [1, -1, 1, 1, -1],
        ]
    )
    # Column sums 2, 0, -2, 0, 0: the ties take the tie-break value.
    tie = np.array([-1, -1, 1, 1, -1], dtype=np.float32)
    assert np.array_equal(majority_vote(votes, tie), [1, -1, -1, 1, -1])
    assert np.array_equal(majority_vote(votes[:3], tie), [1, 1, -1, -1, 1])
    base = np.array([1.0, 2.0], dtype=np.float32)
    assert np.array_equal(apply_sign_step(base, np.array([1.0, -1.0]), 0.25), [1.25, 1.75])


def test_scaled_sign_round_trip_and_bytes():
    x = sample(7)
    packed, scales = encode_scaled_sign(x, SIZES)
    assert packed.size == packed_size(x.size, 1) and scales.shape == (len(SIZES),)
    decoded = decode_scaled_sign(packed, scales, SIZES)
    pieces = np.split(x, np.cumsum(SIZES)[:-1])
    expected = np.concatenate([np.abs(p).mean() * np.where(p >= 0, 1, -1) for p in pieces])
    assert np.allclose(decoded, expected, rtol=1e-6)


# ------------------------------------------------------------------ clients and strategies
def cfg_for(tmp_path, strategy, **overrides):
    raw = {
        "strategy": strategy,
        "device": "cpu",
        "min-available-clients": 1,
        "local-epochs": 1,
        "partitioner": "iid",
        "results-dir": str(tmp_path),
        **overrides,
    }
    return load_config(raw)[0]


def test_ef_residual_is_carried_across_rounds(tmp_path):
    cfg = cfg_for(tmp_path, "ef-signsgd")
    context = Context(0, 1, {}, RecordDict(), cfg.as_dict())
    data = TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))

    def client() -> EFSignSGDClient:  # rebuilt per round, as Flower does
        model = build_model("digits-cnn-bn", in_channels=1, num_classes=10, image_size=8)
        return EFSignSGDClient(cfg, context=context, model=model, train_set=data, partition_id=0)

    first = client()
    sizes = first.param_sizes  # parameters only; BatchNorm statistics travel as float16 values
    full = sum(first.sizes)
    d1 = np.random.default_rng(1).normal(size=full).astype(np.float32)
    d2 = np.random.default_rng(2).normal(size=full).astype(np.float32)

    def params_of(delta: np.ndarray) -> np.ndarray:
        pieces = split_flat(delta, [tuple(s) for s in first.shapes])
        return np.concatenate([pieces[i].reshape(-1) for i in first.p_index])

    packed, scales, stats = first.compress(d1, {"server-round": 1})
    assert stats.dtype == np.float16 and stats.size == first.layout.num_extras
    sent1 = decode_scaled_sign(packed, scales, sizes)
    residual1 = context.state[EF_STATE_KEY]["residual"].numpy()
    assert np.allclose(residual1, params_of(d1) - sent1, atol=1e-6)
    assert np.abs(residual1).max() > 0
    packed2, scales2, _ = client().compress(d2, {"server-round": 2})
    sent2 = decode_scaled_sign(packed2, scales2, sizes)
    corrected = params_of(d2) + residual1
    expected = decode_scaled_sign(*encode_scaled_sign(corrected, sizes), sizes)
    assert np.allclose(sent2, expected, atol=1e-6)
    assert np.allclose(
        context.state[EF_STATE_KEY]["residual"].numpy(), corrected - sent2, atol=1e-5
    )


def test_ef_signsgd_keeps_batchnorm_variances_positive(tmp_path):
    """A scaled-sign step on running variances drove them negative (NaN loss, 3 clients)."""
    strategy = run_inprocess(
        {
            "strategy": "ef-signsgd",
            "device": "cpu",
            "num-server-rounds": 3,
            "results-dir": str(tmp_path),
        },
        num_clients=3,
    )
    assert all(np.isfinite(row["loss"]) for row in strategy.history)
    keys = wire_keys(strategy.model)
    variances = [a for k, a in zip(keys, strategy.global_state, strict=True) if "running_var" in k]
    assert variances and all(v.min() > 0 for v in variances)


def test_dadaquant_levels_double_on_a_plateau():
    doubler = PlateauDoubler(levels=1, patience=2, smoothing=0.0)
    assert [doubler.observe(v) for v in (2.0, 1.0, 0.5)] == [1, 1, 1]  # improving
    assert doubler.observe(0.6) == 1  # one round without improvement
    assert doubler.observe(0.7) == 2  # second one: plateau, q doubles
    assert doubler.observe(0.8) == 2 and doubler.observe(0.9) == 4
    assert doubler.observe(0.1) == 4
    capped = PlateauDoubler(levels=100, patience=1, smoothing=0.0)
    capped.observe(1.0)
    assert capped.observe(1.0) == 127


def test_dadaquant_client_levels_grow_with_data_share():
    assert np.array_equal(client_levels(4, np.array([10, 10, 10])), [4, 4, 4])
    levels = client_levels(8, np.array([10, 40, 150]))
    assert levels[0] < levels[1] < levels[2] and levels.min() >= 1
    weights = np.array([10, 40, 150]) / 200
    # Same aggregate variance (sum w^2 / q^2) as uniform q = 8, up to rounding.
    ratio = np.sum(weights**2 / levels**2) / np.sum(weights**2 / 64)
    assert 0.8 < ratio < 1.25


@pytest.mark.parametrize("strategy", METHOD_NAMES)
def test_payload_errors_are_rejected_with_a_reason(tmp_path, strategy):
    server = build_strategy(cfg_for(tmp_path, strategy))
    assert strategy in METHODS.names()
    for garbage in ([], [np.zeros(3, dtype=np.uint8)] * 3, [np.ones(2, dtype=np.float64)] * 2):
        with pytest.raises(PayloadError, match="uplink"):
            server.decode_uplink(1, "1", fit_res(garbage))
    with pytest.raises(PayloadError):
        server.decode_uplink(1, "1", fit_res(ndarrays_to_parameters(server.global_state)))


def test_signsgd_clients_rebuild_the_server_model_from_1_bit_downlinks(tmp_path):
    base = {
        "strategy": "signsgd",
        "device": "cpu",
        "min-available-clients": 1,
        "local-epochs": 1,
        "partitioner": "iid",
        "results-dir": str(tmp_path),
        "signsgd-server-lr": 0.01,
    }
    contexts = make_contexts(load_config(base)[0].as_dict(), 3)
    three = run_inprocess({**base, "num-server-rounds": 3}, 3, contexts=contexts)
    two = run_inprocess({**base, "num-server-rounds": 2, "run-name": "two"}, 3)
    # After round 3 every client holds global(2), rebuilt from signs in rounds 2 and 3.
    for context in contexts:
        held = context.state[SIGNSGD_STATE_KEY]["global"].numpy()
        assert np.array_equal(held, np.concatenate([a.reshape(-1) for a in two.global_state]))
        assert context.state[SIGNSGD_STATE_KEY + "-round"]["round"] == 2
    rows = three.history
    assert [r["full_downlinks"] for r in rows[1:]] == [3, 0, 0]
    assert rows[1]["downlink_bpp"] > 32 and rows[2]["downlink_bpp"] < 1.2
    assert rows[2]["uplink_bpp"] < 1.2 and rows[3]["downlink_bpp"] < 1.2
    assert not np.array_equal(two.global_state[0], three.global_state[0])


def test_signsgd_client_that_missed_rounds_gets_the_full_model(tmp_path):
    cfg = cfg_for(tmp_path, "signsgd")
    server = build_strategy(cfg)
    server.vote_message, server.vote_round = [np.zeros(1, dtype=np.uint8)], 4
    server.vote_state = server.global_state  # the vote of round 4 made the current model
    server.holds = {"1": 3, "2": 2}
    assert server.fit_config(5, "1")["signsgd-downlink"] == "sign"
    assert server.fit_config(5, "2")["signsgd-downlink"] == "full"
    assert server.fit_config(5, "3")["signsgd-downlink"] == "full"
    assert server.downlink_arrays(5, "2") is server.global_state
    # A refused aggregate kept the old model: the vote does not lead to it, so no sign.
    server.vote_state = [a.copy() for a in server.global_state]
    assert server.fit_config(5, "1")["signsgd-downlink"] == "full"


@pytest.mark.slow
def test_every_baseline_runs_and_sends_what_it_should(tmp_path):
    expected_up = {
        "signsgd": (0.9, 1.3),
        "ef-signsgd": (0.9, 1.3),
        "fedpaq": (3.9, 4.3),
        "qsgd": (4.9, 5.4),
        "feddq": (0.5, 8.5),
        "dadaquant": (1.9, 2.4),
    }
    for strategy, (low, high) in expected_up.items():
        # The packed widths before the entropy stage (the auto default codes FedPAQ's levels).
        overrides = {"strategy": strategy, "num-server-rounds": 2, "run-name": strategy}
        overrides["entropy"] = "none"
        run = run_inprocess({**cfg_for(tmp_path, strategy).as_dict(), **overrides}, 3)
        summary = run.summary()
        assert summary["completed"] and summary["rejected"] == 0 and summary["failures"] == 0
        assert low <= summary["uplink_bpp"] <= high, (strategy, summary["uplink_bpp"])
        assert summary["final_accuracy"] > 0.3, strategy
        if strategy != "signsgd":
            assert summary["downlink_bpp"] > 32
