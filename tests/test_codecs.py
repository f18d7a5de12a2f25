"""Every wire format through the one ``Codec`` surface: exact round trips, byte counts, array count.

Each case builds a codec for a small layout and a message as its sender would; the test checks
``decode(encode(m)) == m`` field by field, ``payload_nbytes(m)`` equal to the encoded arrays'
bytes, the serialized size (``np.save`` as Flower sends it) equal to that plus one header per
array, and a message with one array missing rejected with the format's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
import torch

from compression import cuq_codec, fedbat_codec, fedbif_codec, lbi_codec
from compression import sign_codec as sc
from compression import update_quantizers as uq
from compression.codec import Codec
from compression.float_codec import FloatStateCodec
from compression.layout import SplitLayout
from tests.helpers import npy_bytes

SPLIT = SplitLayout(quantized_shapes=((6, 3, 3, 3), (10, 12)), extra_shapes=((6,), (10,), (6,)))
SIZES = (162, 6, 120, 10, 6)
RNG = np.random.default_rng(7)


def gen() -> torch.Generator:
    return torch.Generator().manual_seed(3)


def extras(dtype: str = "float16") -> np.ndarray:
    return RNG.normal(size=SPLIT.num_extras).astype(dtype)


def float_state() -> tuple[Codec, object]:
    shapes = [*SPLIT.quantized_shapes, *SPLIT.extra_shapes]
    return FloatStateCodec(shapes), [RNG.normal(size=s).astype(np.float32) for s in shapes]


def fedbif_down() -> tuple[Codec, object]:
    words = RNG.integers(0, 8, SPLIT.num_quantized).astype(np.uint8)
    steps = np.float32([0.01, 0.2])
    return fedbif_codec.FedBiFDownlinkCodec(SPLIT, 3, "float32"), fedbif_codec.DownlinkMessage(
        words, steps, extras("float32")
    )


def fedbif_up() -> tuple[Codec, object]:
    codes = RNG.integers(0, 4, SPLIT.num_quantized).astype(np.uint8)
    return fedbif_codec.FedBiFUplinkCodec(SPLIT, 2), fedbif_codec.UplinkMessage(codes, extras())


def fedbat_up() -> tuple[Codec, object]:
    bits = RNG.integers(0, 2, SPLIT.num_quantized).astype(np.uint8)
    message = fedbat_codec.UplinkMessage(bits, np.float32([0.01, 0.03]), extras())
    return fedbat_codec.FedBATUplinkCodec(SPLIT), message


def cuq_up() -> tuple[Codec, object]:
    layout = cuq_codec.CuqLayout(SPLIT, 3, "channel")
    codes = RNG.integers(0, 8, SPLIT.num_quantized).astype(np.uint8)
    clips = RNG.uniform(0.1, 1.0, layout.num_clips).astype(np.float32)
    message = cuq_codec.CuqMessage(codes, clips, np.float32([0.5, 1.5]), extras())
    return cuq_codec.CuqCodec(layout, with_errors=True), message


def cuq_down() -> tuple[Codec, object]:
    layout = cuq_codec.CuqLayout(SPLIT, 2, "layer")
    codes = RNG.integers(0, 4, SPLIT.num_quantized).astype(np.uint8)
    message = cuq_codec.CuqMessage(codes, np.float32([0.3, 0.7]), None, extras())
    return cuq_codec.CuqCodec(layout, with_errors=False), message


def lbi_weights() -> tuple[Codec, object]:
    tensors = [RNG.normal(size=s).astype(np.float32) for s in SPLIT.quantized_shapes]
    codes, scales = lbi_codec.quantize_weights(tensors, 6, "stochastic", gen())
    message = lbi_codec.WeightMessage(6, codes, scales, extras())
    return lbi_codec.LBIWeightCodec(SPLIT), message


def signs() -> tuple[Codec, object]:
    values = np.where(RNG.random(200) < 0.5, 1.0, -1.0).astype(np.float32)
    return sc.SignCodec(200, 16), sc.SignMessage(values, extras()[:16])


def scaled_signs() -> tuple[Codec, object]:
    flat = RNG.normal(size=sum(SIZES)).astype(np.float32)
    signs_, scales = sc.scaled_sign(flat, SIZES)
    return sc.ScaledSignCodec(SIZES, 16), sc.ScaledSignMessage(signs_, scales, extras()[:16])


def symmetric() -> tuple[Codec, object]:
    flat = RNG.normal(size=sum(SIZES)).astype(np.float32)
    return uq.SymmetricCodec(SIZES, 5), uq.quantize_symmetric(flat, SIZES, 5, gen())


def qsgd() -> tuple[Codec, object]:
    flat = RNG.normal(size=sum(SIZES)).astype(np.float32)
    return uq.QSGDCodec(flat.size, 15, 64), uq.quantize_qsgd(flat, 15, 64, gen())


def fixed_step() -> tuple[Codec, object]:
    flat = RNG.normal(scale=0.01, size=sum(SIZES)).astype(np.float32)
    return uq.FixedStepCodec(SIZES), uq.quantize_fixed_step(flat, SIZES, 0.002, gen())


CASES: dict[str, Callable[[], tuple[Codec, object]]] = {
    "float state": float_state,
    "FedBiF downlink": fedbif_down,
    "FedBiF uplink": fedbif_up,
    "FedBAT uplink": fedbat_up,
    "clipped-uq uplink": cuq_up,
    "clipped-uq downlink": cuq_down,
    "LBI-FL weights": lbi_weights,
    "SignSGD": signs,
    "EF-SignSGD": scaled_signs,
    "symmetric levels": symmetric,
    "QSGD": qsgd,
    "FedDQ fixed step": fixed_step,
}


def with_entropy(make: Callable[[], tuple[Codec, object]]) -> Callable[[], tuple[Codec, object]]:
    """The same case with its code arrays as ``compression.entropy`` streams (``entropy=ans``)."""

    def build() -> tuple[Codec, object]:
        codec, message = make()
        if isinstance(codec, cuq_codec.CuqCodec):  # the clipped-UQ layout owns the code array
            layout = dataclasses.replace(codec.layout, entropy="ans")
            return dataclasses.replace(codec, layout=layout), message
        return dataclasses.replace(codec, entropy="ans"), message

    return build


def cuq_layer_widths() -> tuple[Codec, object]:
    """Per-tensor widths (2 and 4 bits): one stream over the 4-bit alphabet."""
    layout = cuq_codec.CuqLayout(SPLIT, 3, "layer", (2, 4))
    first, second = SPLIT.quantized_sizes
    codes = np.concatenate([RNG.integers(0, 4, first), RNG.integers(0, 16, second)])
    message = cuq_codec.CuqMessage(
        codes.astype(np.uint8), np.float32([0.3, 0.7]), np.float32([0.5, 1.5]), extras()
    )
    return cuq_codec.CuqCodec(layout, with_errors=True), message


CASES["clipped-uq per-tensor widths"] = cuq_layer_widths
CASES |= {
    f"{name} + ans": with_entropy(CASES[name])
    for name in (
        "FedBiF downlink",
        "FedBiF uplink",
        "symmetric levels",
        "QSGD",
        "clipped-uq uplink",
        "clipped-uq downlink",
        "clipped-uq per-tensor widths",
        "LBI-FL weights",
    )
}


def test_a_code_beyond_its_tensors_width_is_refused_in_one_entropy_stream() -> None:
    codec, message = with_entropy(cuq_layer_widths)()
    codes = message.codes.copy()
    codes[0] = 9  # a 4-bit symbol in the 2-bit tensor: the stream's alphabet allows it
    arrays = codec.encode(dataclasses.replace(message, codes=codes))
    with pytest.raises(ValueError, match="tensor 0: a code beyond its 2-bit width"):
        codec.decode(arrays)


def fields_of(message: object) -> dict[str, object]:
    if isinstance(message, list):
        return {str(i): a for i, a in enumerate(message)}
    return {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_exact_and_bytes_are_counted(name: str) -> None:
    codec, message = CASES[name]()
    arrays = codec.encode(message)
    assert len(arrays) == codec.num_arrays
    decoded = codec.decode(arrays)
    for field, value in fields_of(message).items():
        got = fields_of(decoded)[field]
        if value is None:
            assert got is None
        else:  # decoded floats may come back widened (float16 extras as float32): same values
            np.testing.assert_array_equal(np.asarray(got), np.asarray(value), err_msg=field)
    raw = sum(int(a.nbytes) for a in arrays)
    assert codec.payload_nbytes(message) == raw
    assert sum(npy_bytes(a) for a in arrays) == raw + sum(npy_bytes(a[:0]) for a in arrays)


@pytest.mark.parametrize("name", list(CASES))
def test_a_missing_array_is_rejected_with_the_format_name(name: str) -> None:
    codec, message = CASES[name]()
    arrays = codec.encode(message)
    with pytest.raises(ValueError, match=f"{codec.name} has {codec.num_arrays} arrays, got"):
        codec.decode(arrays[:-1])


def test_codecs_pack_codes_at_their_width() -> None:
    """The codes array is exactly ceil(d * k / 8) bytes: bits are really packed."""
    for make, bits in ((fedbif_down, 3), (fedbif_up, 2), (fedbat_up, 1), (cuq_up, 3)):
        codec, message = make()
        assert codec.encode(message)[0].nbytes == -(-SPLIT.num_quantized * bits // 8)


@pytest.mark.parametrize("name", [n for n in CASES if n.endswith("+ ans")])
def test_a_corrupt_entropy_stream_is_rejected(name: str) -> None:
    codec, message = CASES[name]()
    arrays = codec.encode(message)
    corrupt = arrays[0].copy()
    corrupt[-1] ^= np.uint8(0x5A)
    with pytest.raises(ValueError):
        codec.decode([corrupt, *arrays[1:]])
    with pytest.raises(ValueError):
        codec.decode([arrays[0][:-2], *arrays[1:]])
