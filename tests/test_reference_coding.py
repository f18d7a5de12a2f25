"""Reference coding (``downlink-reference=last``): codes sent as their difference from the codes
the client kept. Exact round trips, refusals of a basis the receiver does not hold, byte counts,
and whole FedBiF runs that are bit-identical to full messages while sending fewer bytes, also
with partial participation and clients that fail."""

from __future__ import annotations

import numpy as np
import pytest

from compression import reference
from compression.fedbif_codec import (
    DownlinkMessage,
    FedBiFDownlinkCodec,
    FedBiFUplinkCodec,
    UplinkMessage,
)
from compression.layout import SplitLayout
from core.settings import ConfigError
from tests.helpers import npy_bytes
from tools.inprocess import run_inprocess


@pytest.mark.parametrize("bits", range(1, 9))
def test_difference_and_restore_round_trip_every_width(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, 5000).astype(np.uint8)
    basis = rng.integers(0, 1 << bits, 5000).astype(np.uint8)
    diff = reference.difference(codes, basis, bits)
    assert diff.dtype == np.uint8 and int(diff.max()) < 1 << bits
    np.testing.assert_array_equal(reference.restore(diff, basis, bits), codes)
    # Unchanged codes give an all-zero difference (what makes it cheap to entropy-code).
    assert not reference.difference(codes, codes, bits).any()


def test_headers_name_the_basis_and_hostile_headers_are_refused():
    basis = reference.Basis(7, np.arange(10, dtype=np.uint8))
    assert reference.read_header(reference.header(basis)) == (7, basis.digest)
    assert reference.read_header(reference.header(None)) == (reference.NO_BASIS, 0)
    for bad, reason in [
        (np.array([1, 2], np.int32), "int64"),
        (np.array([1, 2, 3], np.int64), "shape"),
        (np.array([-1, 0], np.int64), "< 0"),
        (np.array([3, 1 << 32], np.int64), "CRC"),
        (np.array([0, 5], np.int64), "CRC"),
    ]:
        with pytest.raises(ValueError, match=reason):
            reference.read_header(bad)
    with pytest.raises(ValueError, match=">= 1"):
        reference.Basis(0, basis.codes)


def test_a_difference_against_codes_the_receiver_does_not_hold_is_refused():
    rng = np.random.default_rng(0)
    held = reference.Basis(3, rng.integers(0, 16, 100).astype(np.uint8))
    diff = np.zeros(100, np.uint8)
    np.testing.assert_array_equal(reference.resolve(diff, 3, held.digest, held, 4), held.codes)
    with pytest.raises(ValueError, match="holds none"):
        reference.resolve(diff, 3, held.digest, None, 4)
    with pytest.raises(ValueError, match="holds round 3"):
        reference.resolve(diff, 2, held.digest, held, 4)
    other = held.codes.copy()
    other[0] ^= 1
    with pytest.raises(ValueError, match="CRC"):  # same round, other words
        reference.resolve(diff, 3, held.digest, reference.Basis(3, other), 4)


def _codec(entropy: str = "ans") -> FedBiFDownlinkCodec:
    split = SplitLayout(quantized_shapes=((64, 32), (10, 64)), extra_shapes=((10,),))
    return FedBiFDownlinkCodec(split, 4, "float16", entropy, reference=True)


def test_fedbif_downlink_against_a_basis_is_exact_smaller_and_counted():
    codec = _codec()
    rng = np.random.default_rng(1)
    d = codec.split.num_quantized
    old = rng.integers(0, 16, d).astype(np.uint8)
    new = old.copy()
    flips = rng.random(d) < 0.1
    new[flips] ^= np.uint8(8)  # one bit position changed in 10% of the words
    steps = np.array([0.1, 0.2], np.float32)
    extras = rng.standard_normal(10).astype(np.float16)
    full = DownlinkMessage(new, steps, extras)
    coded = DownlinkMessage(new, steps, extras, basis=reference.Basis(4, old))
    full_arrays, coded_arrays = codec.encode(full), codec.encode(coded)
    assert len(coded_arrays) == codec.num_arrays == 4
    assert coded_arrays[1].nbytes < 0.4 * full_arrays[1].nbytes
    assert codec.payload_nbytes(coded) == sum(a.nbytes for a in coded_arrays)
    got = codec.decode_with(coded_arrays, reference.Basis(4, old))
    np.testing.assert_array_equal(got.words, new)
    np.testing.assert_array_equal(got.extras, extras)
    # A full message needs no basis; a coded one refuses a receiver without the right one.
    np.testing.assert_array_equal(codec.decode(full_arrays).words, new)
    with pytest.raises(ValueError, match="holds none"):
        codec.decode(coded_arrays)
    with pytest.raises(ValueError, match="holds round 5"):
        codec.decode_with(coded_arrays, reference.Basis(5, old))
    with pytest.raises(ValueError, match="4 arrays"):
        codec.decode_with(coded_arrays[1:], reference.Basis(4, old))


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"strategy": "fedavg", "downlink-reference": "last"}, "has no downlink codes"),
        ({"strategy": "fedbif", "downlink-reference": "last", "entropy": "none"}, "entropy='ans'"),
        ({"strategy": "fedbif", "downlink-reference": "first", "entropy": "ans"}, "none"),
    ],
)
def test_reference_coding_where_it_cannot_apply_fails_at_start(raw, reason):
    from fl_app.methods import load_config

    with pytest.raises(ConfigError, match=reason):
        load_config(raw)


def _run(tmp_path, name: str, strategy: str = "fedbif", **overrides) -> object:  # noqa: ANN001
    config = {
        "strategy": strategy,
        "device": "cpu",
        "num-server-rounds": 4,
        "local-epochs": 1,
        "partitioner": "iid",
        "entropy": "ans",
        # every stage off unless a test turns it on (their default, auto, turns them on)
        "downlink-reference": "none",
        "uplink-reference": "none",
        "checkpoint": False,
        "results-dir": str(tmp_path / name),
        **overrides,
    }
    return run_inprocess(config, 4)


@pytest.mark.parametrize(
    "setting",
    [
        {},  # every client every round: all but round 1 are coded against the last words
        {"fraction-fit": 0.5, "min-available-clients": 4},
        {"attack": "crash", "attack-fraction": 0.25},  # failed clients are sent full words
    ],
    ids=["full", "partial", "failing-clients"],
)
def test_fedbif_runs_are_bit_identical_with_reference_coding_and_send_less(tmp_path, setting):
    plain = _run(tmp_path, "plain", **setting)
    coded = _run(tmp_path, "coded", **setting, **{"downlink-reference": "last"})
    for a, b in zip(plain.global_state, coded.global_state, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(plain.history, coded.history, strict=True):
        for key in ("accuracy", "loss", "uplink_bytes", "failures", "rejected"):
            assert a[key] == pytest.approx(b[key], rel=0, abs=0, nan_ok=True), key
    assert sum(h["failures"] for h in coded.history) == sum(h["failures"] for h in plain.history)
    down = [h["downlink_bytes"] for h in coded.history if h["round"] > 0]
    plain_down = [h["downlink_bytes"] for h in plain.history if h["round"] > 0]
    # Round 1: full words plus the 16-byte header (and its .npy framing) per client.
    assert down[0] > plain_down[0]
    assert sum(down) < sum(plain_down)
    if not setting:
        # Later rounds: every message is coded against the previous round's words.
        header = npy_bytes(reference.header(None))
        assert all(d < p - 4 * header for d, p in zip(down[1:], plain_down[1:], strict=True))
        assert sum(down) < 0.8 * sum(plain_down)


def test_uq_downlink_against_the_clients_last_codes_is_exact_and_counted():
    from compression.downlink_codec import DownlinkLayout, decode_uq_codes, quantize_uq, uq_arrays

    rng = np.random.default_rng(3)
    state = [rng.standard_normal((8, 3, 3, 3)).astype(np.float32), np.ones(8, np.float32)]
    layout = DownlinkLayout(((8, 3, 3, 3), (8,)), per_channel=True)
    old = quantize_uq(state, layout, 4)
    state[0][:2] += 0.05  # a small update moves a few codes
    new = quantize_uq(state, layout, 4)
    basis = reference.Basis(2, old.codes)
    coded = uq_arrays(new, 4, entropy_mode="ans", with_header=True, basis=basis)
    full = uq_arrays(new, 4, entropy_mode="ans", with_header=True)
    assert coded[1].nbytes < full[1].nbytes
    got, codes = decode_uq_codes(coded, layout, 4, entropy_mode="ans", with_header=True, held=basis)
    want, _ = decode_uq_codes(full, layout, 4, entropy_mode="ans", with_header=True)
    np.testing.assert_array_equal(codes, new.codes)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="holds none"):
        decode_uq_codes(coded, layout, 4, entropy_mode="ans", with_header=True)
    with pytest.raises(ValueError, match="4 arrays"):
        decode_uq_codes(coded[1:], layout, 4, entropy_mode="ans", with_header=True, held=basis)


@pytest.mark.parametrize("strategy", ["fedpaq", "fedavg"])
def test_uq_downlink_runs_are_bit_identical_with_reference_coding(tmp_path, strategy):
    setting = {"downlink": "uq", "fraction-fit": 0.75, "min-available-clients": 4}
    plain = _run(tmp_path, "plain", strategy, **setting)
    coded = _run(tmp_path, "coded", strategy, **setting, **{"downlink-reference": "last"})
    for a, b in zip(plain.global_state, coded.global_state, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(plain.history, coded.history, strict=True):
        for key in ("accuracy", "loss", "uplink_bytes"):
            assert a[key] == pytest.approx(b[key], rel=0, abs=0, nan_ok=True), key
    later = slice(2, None)  # from round 2 on, clients that took part before get differences
    assert sum(h["downlink_bytes"] for h in coded.history[later]) < sum(
        h["downlink_bytes"] for h in plain.history[later]
    )


def test_lbi_uploads_against_the_received_codes_are_bit_identical_and_smaller(tmp_path):
    """``lbi-uplink-reference``: the server holds what it sent, so every upload at the received
    width is coded against it; nothing changes but the uplink bytes."""
    setting = {"lbi-mode": "ui4", "fraction-fit": 0.75, "min-available-clients": 4}
    plain = _run(tmp_path, "plain", "lbi-fl", **setting)
    coded = _run(tmp_path, "coded", "lbi-fl", **setting, **{"lbi-uplink-reference": True})
    for a, b in zip(plain.global_state, coded.global_state, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(plain.history, coded.history, strict=True):
        for key in ("accuracy", "loss", "rejected"):
            assert a[key] == pytest.approx(b[key], rel=0, abs=0, nan_ok=True), key
    assert sum(h["rejected"] for h in coded.history) == 0
    assert sum(h["uplink_bytes"] for h in coded.history) < 0.8 * sum(
        h["uplink_bytes"] for h in plain.history
    )


def test_an_lbi_upload_against_other_codes_is_refused():
    from compression import lbi_codec

    split = SplitLayout(quantized_shapes=((4, 6),), extra_shapes=((4,),))
    codec = lbi_codec.LBIWeightCodec(split, entropy="ans", reference=True)
    rng = np.random.default_rng(0)
    sent = rng.integers(-7, 8, 24).astype(np.int8)
    basis = reference.Basis(3, lbi_codec.unsigned_codes(sent, 4))
    message = lbi_codec.WeightMessage(
        4, sent, np.ones(4, np.float32), np.zeros(4, np.float16), basis
    )
    arrays = codec.encode(message)
    np.testing.assert_array_equal(codec.decode_with(arrays, basis).codes, sent)
    with pytest.raises(ValueError, match="holds round 2"):
        codec.decode_with(arrays, reference.Basis(2, basis.codes))


# ------------------------------------------------------------------------- uplink-reference
def _fedbif_uplink_codec(active_bits: int, **kwargs) -> FedBiFUplinkCodec:
    split = SplitLayout(quantized_shapes=((6, 5), (7,)), extra_shapes=((3,),))
    return FedBiFUplinkCodec(split, active_bits, "float16", "ans", reference=True, **kwargs)


@pytest.mark.parametrize("active_bits", range(1, 9))
def test_fedbif_uplink_against_the_received_bits_round_trips_at_every_width(active_bits):
    rng = np.random.default_rng(active_bits)
    codec = _fedbif_uplink_codec(active_bits)
    d = codec.split.num_quantized
    received = rng.integers(0, 1 << active_bits, d).astype(np.uint8)
    codes = received.copy()
    flipped = rng.random(d) < 0.2
    codes[flipped] = rng.integers(0, 1 << active_bits, int(flipped.sum())).astype(np.uint8)
    basis = reference.Basis(5, received)
    extras = rng.standard_normal(3).astype(np.float16)
    arrays = codec.encode(UplinkMessage(codes, extras, basis))
    assert len(arrays) == 3 and tuple(reference.read_header(arrays[0])) == (5, basis.digest)
    got = codec.decode_with(arrays, basis)
    np.testing.assert_array_equal(got.codes, codes)
    np.testing.assert_array_equal(got.extras, extras)
    # without a basis the same codec sends full codes under round 0
    full = codec.encode(UplinkMessage(codes, extras))
    np.testing.assert_array_equal(codec.decode_with(full, basis).codes, codes)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda arrays, basis: (arrays, reference.Basis(4, basis.codes)), "holds round 4"),
        (
            lambda arrays, basis: (arrays, reference.Basis(5, basis.codes ^ np.uint8(1))),
            "CRC",
        ),
        (lambda arrays, basis: (arrays, None), "holds none"),
        (lambda arrays, basis: (arrays[1:], basis), "has 3 arrays"),
        (lambda arrays, basis: ([arrays[0], arrays[1][:-3], arrays[2]], basis), "ANS|entropy"),
        (
            lambda arrays, basis: ([np.array([5, 1, 2], np.int64), *arrays[1:]], basis),
            "reference header",
        ),
    ],
    ids=["wrong-round", "wrong-basis", "no-basis", "missing-header", "truncated", "bad-header"],
)
def test_hostile_uplink_references_are_refused(mutate, match):
    rng = np.random.default_rng(9)
    codec = _fedbif_uplink_codec(1)
    d = codec.split.num_quantized
    received = rng.integers(0, 2, d).astype(np.uint8)
    basis = reference.Basis(5, received)
    arrays = codec.encode(UplinkMessage(received ^ np.uint8(1), np.zeros(3, np.float16), basis))
    arrays, held = mutate(list(arrays), basis)
    with pytest.raises(ValueError, match=match):
        codec.decode_with(arrays, held)


@pytest.mark.parametrize(
    "setting",
    [{}, {"fraction-fit": 0.5, "min-available-clients": 4}, {"fedbif-active-bits": 2}],
    ids=["full", "partial", "two-bits"],
)
def test_fedbif_runs_with_uplink_reference_are_bit_identical_and_send_less(tmp_path, setting):
    """The server holds the bits it sent, so every upload is coded against them; the global
    model, accuracy and everything but the uplink bytes stay exactly as without it."""
    plain = _run(tmp_path, "plain", **setting)
    coded = _run(tmp_path, "coded", **setting, **{"uplink-reference": "received"})
    for a, b in zip(plain.global_state, coded.global_state, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(plain.history, coded.history, strict=True):
        for key in ("accuracy", "loss", "downlink_bytes", "rejected", "failures"):
            assert a[key] == pytest.approx(b[key], rel=0, abs=0, nan_ok=True), key
    assert sum(h["rejected"] for h in coded.history) == 0
    assert sum(h["uplink_bytes"] for h in coded.history) < 0.8 * sum(
        h["uplink_bytes"] for h in plain.history
    )


def test_lbi_uplink_reference_key_and_its_old_alias_send_the_same_bytes(tmp_path):
    setting = {"lbi-mode": "ui4", "num-server-rounds": 2}
    new = _run(tmp_path, "new", "lbi-fl", **setting, **{"uplink-reference": "received"})
    old = _run(tmp_path, "old", "lbi-fl", **setting, **{"lbi-uplink-reference": True})
    assert [h["uplink_bytes"] for h in new.history] == [h["uplink_bytes"] for h in old.history]
    for a, b in zip(new.global_state, old.global_state, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (
            {
                "strategy": "fedavg",
                "uplink-reference": "received",
                "entropy": "ans",
                "downlink": "uq",
            },
            "uploads no codes",
        ),
        (
            {"strategy": "fedbif", "uplink-reference": "received", "entropy": "none"},
            "entropy='ans'",
        ),
    ],
)
def test_uplink_reference_where_it_cannot_apply_is_refused_at_start(raw, match):
    from core.config import ConfigError
    from fl_app.methods import load_config

    with pytest.raises(ConfigError, match=match):
        load_config(raw)


@pytest.mark.parametrize("strategy", ["fedbif", "fedavg"])
def test_a_memory_cap_on_reference_codes_changes_bytes_never_the_model(tmp_path, strategy):
    """Partial participation keeps several rounds' codes; a cap below one round's codes drops
    them, the clients that held them are sent full codes, and the model stays bit for bit."""
    setting = {
        "fraction-fit": 0.5,
        "min-available-clients": 4,
        "downlink-reference": "last",
        "num-server-rounds": 5,
    }
    if strategy == "fedavg":
        setting["downlink"] = "uq"
    free = _run(tmp_path, "free", strategy, **setting)
    capped = _run(tmp_path, "capped", strategy, **setting, **{"reference-memory-mb": 1e-6})
    for a, b in zip(free.global_state, capped.global_state, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(free.history, capped.history, strict=True):
        assert a["accuracy"] == b["accuracy"] and a["uplink_bytes"] == b["uplink_bytes"]
    assert capped.references.dropped_rounds > 0 and free.references.dropped_rounds == 0
    assert capped.references.nbytes <= 1 and free.references.nbytes > 0
    assert sum(h["downlink_bytes"] for h in capped.history) > sum(
        h["downlink_bytes"] for h in free.history
    )
