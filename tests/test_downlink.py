"""The generic compressed downlink: codec round trips, hostile messages, the aggregation base,
config refusals and whole runs with ``downlink=uq`` (and ``entropy=ans``)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Parameters, parameters_to_ndarrays

from compression.downlink_codec import (
    DownlinkLayout,
    decode_fp16,
    decode_uq,
    encode_fp16,
    encode_uq,
    levels,
)
from compression.packing import packed_size
from core.settings import ConfigError
from tests.helpers import build_test_strategy, fit_res, manager_with, npy_bytes
from tools.inprocess import run_inprocess

RNG = np.random.default_rng(7)
SHAPES = ((8, 3, 3, 3), (8,), (10, 8), (10,), (4, 5))


def random_state(shapes=SHAPES) -> list[np.ndarray]:  # noqa: ANN001
    return [RNG.standard_t(3, size=s).astype(np.float32) for s in shapes]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("entropy_mode", ["none", "ans"])
def test_uq_round_trip_is_within_half_a_step_and_extras_are_exact(bits, per_channel, entropy_mode):
    state = random_state()
    layout = DownlinkLayout(SHAPES, per_channel)
    message = encode_uq(state, layout, bits, entropy_mode=entropy_mode)
    decoded = decode_uq(message, layout, bits, entropy_mode=entropy_mode)
    assert [d.shape for d in decoded] == [s.shape for s in state]
    for i in layout.extras:
        np.testing.assert_array_equal(decoded[i], state[i])
    for i in layout.quantized:
        groups = state[i].reshape(layout.groups(i), -1)
        step = np.abs(groups).max(axis=1, keepdims=True) / levels(bits)
        error = np.abs(decoded[i].reshape(groups.shape) - groups)
        assert (error <= step / 2 + 1e-6).all()
    if entropy_mode == "none":
        assert message[0].size == packed_size(layout.num_codes, bits)
    assert message[1].shape == (layout.num_scales,) and message[2].shape == (layout.num_extras,)
    # Lossless entropy stage: the same model either way.
    plain = decode_uq(encode_uq(state, layout, bits), layout, bits)
    for a, b in zip(decoded, plain, strict=True):
        np.testing.assert_array_equal(a, b)


def test_stochastic_rounding_is_unbiased():
    layout = DownlinkLayout(((1, 64),), per_channel=True)
    weights = np.linspace(-1.0, 0.9, 64, dtype=np.float32).reshape(1, 64)
    rng = np.random.default_rng(3)
    draws = 4000
    total = np.zeros_like(weights, dtype=np.float64)
    for _ in range(draws):
        message = encode_uq([weights], layout, 3, stochastic=True, rng=rng)
        total += decode_uq(message, layout, 3)[0]
    step = 1.0 / levels(3)
    # Each draw's error is within one step; its std is at most step / 2: 5 sigma of the mean.
    np.testing.assert_allclose(total / draws, weights, atol=5 * (step / 2) / np.sqrt(draws))


def test_zero_and_empty_tensors_survive():
    shapes = ((4, 0), (3, 2), (0,))
    state = [np.zeros(s, np.float32) for s in shapes]
    layout = DownlinkLayout(shapes, per_channel=True)
    for entropy_mode in ("none", "ans"):
        decoded = decode_uq(
            encode_uq(state, layout, 4, entropy_mode=entropy_mode),
            layout,
            4,
            entropy_mode=entropy_mode,
        )
        for a, b in zip(decoded, state, strict=True):
            np.testing.assert_array_equal(a, b)


def test_hostile_uq_messages_are_refused():
    state = random_state()
    layout = DownlinkLayout(SHAPES, per_channel=True)
    codes, scales, extras = encode_uq(state, layout, 4)
    cases = {
        "3 arrays": [codes, scales],
        "1-D uint8": [codes.astype(np.int16), scales, extras],
        "need": [codes[:-1], scales, extras],
        "scales: expected float32": [codes, scales.astype(np.float64), extras],
        "extras: expected float32": [codes, scales, extras[:-1]],
        "not finite": [codes, np.where(np.arange(scales.size) == 0, np.nan, scales), extras],
        ">= 0": [codes, -scales, extras],
        "code above 14": [np.full_like(codes, 0xFF), scales, extras],
        # finite, but 7 levels of it overflow float32: refused, never decoded to inf
        "would overflow float32": [codes, np.full_like(scales, 1e38), extras],
    }
    for reason, arrays in cases.items():
        with pytest.raises(ValueError, match=reason):
            decode_uq([np.asarray(a) for a in arrays], layout, 4)
    largest = np.full_like(scales, np.finfo(np.float32).max / 7)  # the largest that decodes
    decoded = decode_uq([codes, largest, extras], layout, 4)[0]
    assert all(np.isfinite(a).all() for a in decoded)
    stream = encode_uq(state, layout, 4, entropy_mode="ans")[0]
    with pytest.raises(ValueError):
        decode_uq([stream[:-3], scales, extras], layout, 4, entropy_mode="ans")


def test_fp16_round_trip_saturates_instead_of_overflowing():
    state = [np.array([1e6, -1e6, 0.1], np.float32), np.ones((2, 2), np.float32)]
    message = encode_fp16(state)
    assert [m.dtype for m in message] == [np.float16, np.float16]
    decoded = decode_fp16(message, [s.shape for s in state])
    assert np.isfinite(decoded[0]).all() and decoded[0][0] == 65504.0
    with pytest.raises(ValueError, match="float16"):
        decode_fp16([m.astype(np.float32) for m in message], [s.shape for s in state])
    with pytest.raises(ValueError, match="not finite"):
        decode_fp16([np.array([np.inf, 0, 0], np.float16), message[1]], [(3,), (2, 2)])


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"strategy": "fedbif", "downlink": "uq"}, "sends its paper's own"),
        ({"strategy": "lbi-fl", "downlink": "fp16"}, "sends its paper's own"),
        ({"strategy": "signsgd", "downlink": "uq"}, "sends its paper's own"),
        ({"strategy": "clipped-uq", "downlink": "uq", "cuq-downlink-bits": 4}, "both compress"),
        ({"strategy": "fedavg", "downlink": "uq", "downlink-bits": 1}, "downlink-bits"),
        ({"strategy": "fedavg", "entropy": "zip"}, "entropy"),
    ],
)
def test_impossible_downlink_settings_fail_at_start(raw, reason):
    from fl_app.methods import load_config

    with pytest.raises(ConfigError, match=reason):
        load_config(raw)


@pytest.mark.parametrize("strategy", ["fedavg", "fedpaq", "ef-signsgd"])
def test_clients_that_return_what_they_received_leave_the_global_model(tmp_path, strategy):
    """A client's change is measured against what it decoded and added to the server's float32
    model: clients that send back exactly what they received change nothing (a change measured
    against the float model would move it by the downlink's rounding error every round, and
    replacing the model by the decoded copy would erase every change below half a step)."""
    base = {
        "strategy": strategy,
        "device": "cpu",
        "downlink": "uq",
        "downlink-bits": 3,
        "entropy": "none",
    }
    server = build_test_strategy(base, tmp_path, **{"min-available-clients": 1})
    instructions = server.configure_fit(1, Parameters([], ""), manager_with(3))
    message = parameters_to_ndarrays(instructions[0][1].parameters)
    assert len(message) == 3 and message[0].dtype == np.uint8  # codes, scales, extras
    received = server.generic_downlink_message(1)[1]
    clients = [client_for(strategy, tmp_path, partition) for partition in range(3)]
    decoded = clients[0].receive(message)
    for a, b in zip(decoded, received, strict=True):
        np.testing.assert_array_equal(a, b)
    replies = []
    for partition, ((proxy, _), client) in enumerate(zip(instructions, clients, strict=True)):
        client.load_downlink(client.receive(message), {})
        replies.append((proxy, fit_res(client.encode_uplink({"server-round": 1}), 10, partition)))
    before = [a.copy() for a in server.global_state]
    assert any(not np.array_equal(a, b) for a, b in zip(before, received, strict=True))
    server.aggregate_fit(1, replies, [])
    assert server.traffic[1].rejected == 0
    for got, want in zip(server.global_state, before, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def client_for(strategy: str, tmp_path, partition: int):  # noqa: ANN001, ANN201
    from flwr.common import Context, RecordDict

    from fl_app.client_app import client_fn

    run_config = {
        "strategy": strategy,
        "device": "cpu",
        "downlink": "uq",
        "downlink-bits": 3,
        "entropy": "none",
    }
    context = Context(
        run_id=1,
        node_id=partition,
        node_config={"partition-id": partition, "num-partitions": 3},
        state=RecordDict(),
        run_config=run_config,
    )
    return client_fn(context).numpy_client  # the method's TrainingClient


def test_a_uq_downlink_run_learns_and_entropy_coding_is_lossless(tmp_path):
    config = {
        "strategy": "fedpaq",
        "device": "cpu",
        "num-server-rounds": 4,
        "local-epochs": 1,
        "partitioner": "iid",
        "downlink": "uq",
        "downlink-bits": 4,
        "checkpoint": False,
        "entropy": "none",
    }
    plain = run_inprocess({**config, "results-dir": str(tmp_path / "plain")}, 4)
    coded = run_inprocess({**config, "results-dir": str(tmp_path / "ans"), "entropy": "ans"}, 4)
    fp32 = run_inprocess({**config, "results-dir": str(tmp_path / "fp32"), "downlink": "fp32"}, 4)
    for a, b in zip(plain.history, coded.history, strict=True):
        for key in ("accuracy", "loss", "train_loss"):
            assert a[key] == pytest.approx(b[key], rel=0, abs=0, nan_ok=True), key
        if a["round"] > 0:  # FedPAQ's own update codes are entropy-coded too
            assert b["downlink_bytes"] < a["downlink_bytes"]
            assert b["uplink_bytes"] < a["uplink_bytes"]
    final = plain.history[-1]
    assert 4.0 < final["downlink_bpp"] < 4.5  # 4-bit codes + per-channel scales + exact extras
    assert final["accuracy"] > 0.8
    assert final["accuracy"] >= fp32.history[-1]["accuracy"] - 0.05
    # Measured bytes are what was serialized: codes, scales and extras with their headers.
    message = plain.generic_downlink_message(4)[0]
    assert plain.traffic[4].downlink_bytes == 4 * sum(npy_bytes(a) for a in message)


@pytest.mark.parametrize("strategy", ["fedbif", "qsgd", "clipped-uq", "lbi-fl"])
def test_entropy_coding_inside_a_methods_codec_is_lossless(tmp_path, strategy):
    config = {
        "strategy": strategy,
        "device": "cpu",
        "num-server-rounds": 3,
        "local-epochs": 1,
        "partitioner": "iid",
        "checkpoint": False,
    }
    plain = run_inprocess({**config, "results-dir": str(tmp_path / "plain"), "entropy": "none"}, 3)
    coded = run_inprocess({**config, "results-dir": str(tmp_path / "ans"), "entropy": "ans"}, 3)
    for a, b in zip(plain.history, coded.history, strict=True):
        for key in ("accuracy", "loss", "train_loss"):
            assert a[key] == pytest.approx(b[key], rel=0, abs=0, nan_ok=True), key
    saved = "downlink_bytes" if strategy == "fedbif" else "uplink_bytes"
    assert coded.history[-1][saved] < plain.history[-1][saved]


def test_entropy_where_nothing_is_coded_fails_at_start():
    from fl_app.methods import load_config

    with pytest.raises(ConfigError, match="no code array"):
        load_config({"strategy": "fedavg", "entropy": "ans"})
    load_config({"strategy": "fedbat", "entropy": "ans", "downlink": "uq"})  # codes: accepted
