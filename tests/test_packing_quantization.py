"""Codecs: bit packing, quantization (Eqs. 1-3), bit layouts (Eq. 4) and the STE step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compression.bits import BitLayout, bit_planes, compose_planes, step_ste
from compression.packing import pack_codes, packed_size, unpack_codes
from compression.primitives import dequantize, max_abs_step, quantize, signed_range


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 1001])
def test_pack_round_trip_every_width_and_odd_lengths(bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    codes = rng.integers(0, 2**bits, size=count, dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_size(count, bits)
    assert packed.size == -(-count * bits // 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, count), codes)


def test_pack_layout_is_lsb_first_stream():
    # codes 1 (01), 2 (10), 3 (11) at 2 bits -> stream 1,0, 0,1, 1,1 -> byte 0b00111001
    assert pack_codes(np.array([1, 2, 3], dtype=np.uint8), 2).tolist() == [0b111001]


def test_pack_rejects_out_of_range_and_bad_lengths():
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(np.array([4], dtype=np.uint8), 2)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_codes(np.zeros(3, dtype=np.uint8), 4, 4)
    with pytest.raises(ValueError, match="bits must be"):
        pack_codes(np.array([0]), 9)


def test_stochastic_quantization_is_unbiased_within_3_sigma():
    torch.manual_seed(0)
    x = torch.randn(64) * 2.0
    step = max_abs_step(x, 8)
    low, high = signed_range(4)
    draws = 4000
    generator = torch.Generator().manual_seed(1)
    total = torch.zeros_like(x)
    for _ in range(draws):
        total += dequantize(quantize(x, step, low, high, generator=generator), step)
    mean = total / draws
    # Each draw is Bernoulli on a grid of width ``step``: sd <= step / 2.
    sigma = step / 2 / draws**0.5
    target = torch.clamp(x, low * step, high * step)
    assert torch.all((mean - target).abs() <= 3 * sigma + 1e-6)


def test_deterministic_quantization_rounds_to_nearest_and_clamps():
    codes = quantize(torch.tensor([0.26, -0.24, 10.0, -10.0]), 0.5, -8, 7, stochastic=False)
    assert codes.tolist() == [1, 0, 7, -8]
    assert max_abs_step(torch.zeros(3), 8) == 1.0


@pytest.mark.parametrize("kind", ["offset", "sign-magnitude"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layouts_round_trip_and_value_from_bits(kind, bits):
    layout = BitLayout(bits, kind)
    codes = torch.arange(layout.low, layout.high + 1, dtype=torch.int32)
    words = layout.to_unsigned(codes)
    assert int(words.max()) < 2**bits
    np.testing.assert_array_equal(layout.to_signed(words).numpy(), codes.numpy())
    planes = bit_planes(words, bits)
    assert planes.shape == (bits, codes.numel())
    np.testing.assert_array_equal(compose_planes(planes).numpy(), words.numpy())
    values = layout.value_from_bits(planes.to(torch.float32))
    np.testing.assert_array_equal(values.numpy(), codes.numpy().astype(np.float32))


def test_offset_layout_matches_eq4_and_zero_pattern():
    layout = BitLayout(4)
    assert (layout.low, layout.high, layout.scale_levels) == (-8, 7, 8)
    # zero <=> top bit 1, others 0
    assert layout.to_unsigned(torch.tensor([0])).item() == 0b1000


def test_step_ste_forward_and_identity_gradient():
    v = torch.tensor([-0.5, 0.0, 0.3, 2.0], requires_grad=True)
    h = step_ste(v)
    assert h.tolist() == [0.0, 0.0, 1.0, 1.0]
    upstream = torch.tensor([1.0, -2.0, 3.0, 4.0])
    (h * upstream).sum().backward()
    assert v.grad.tolist() == upstream.tolist()
    w = torch.tensor([0.7], requires_grad=True)
    (step_ste(w, 0.25) * 2).sum().backward()
    assert w.grad.item() == 0.5
