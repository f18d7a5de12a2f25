"""The fast packing paths produce exactly the documented bit stream, byte for byte.

``tests/test_packing_quantization.py`` checks that packing round-trips; a fast path could still
round-trip through a wrong layout and silently change the wire format. These tests compare the
bytes with a plain bit-by-bit implementation of the format (``reference_pack``), for every width,
for lengths that do not fill the last group of 8 codes, and across the chunk boundaries of the
uint64 path (shrunk here so that small inputs span many chunks).
"""

from __future__ import annotations

import numpy as np
import pytest

from compression import packing
from compression.packing import pack_codes, packed_size, unpack_codes

LENGTHS = [1, 2, 3, 5, 7, 8, 9, 13, 15, 17, 63, 65, 127, 1001]


def reference_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """The wire format as the packing module's docstring states it, one bit at a time: code i's
    bit j is stream bit p = i * bits + j, stored in byte p // 8 at position p % 8."""
    out = bytearray(-(-len(codes) * bits // 8))
    for index, code in enumerate(int(c) for c in codes):
        for j in range(bits):
            if (code >> j) & 1:
                position = index * bits + j
                out[position // 8] |= 1 << (position % 8)
    return np.frombuffer(bytes(out), dtype=np.uint8)


def random_codes(bits: int, count: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * bits + count)
    return rng.integers(0, 2**bits, size=count, dtype=np.uint8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", LENGTHS)
def test_pack_codes_bytes_equal_reference(bits: int, count: int) -> None:
    codes = random_codes(bits, count)
    expected = reference_pack(codes, bits)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (packed_size(count, bits),)
    np.testing.assert_array_equal(packed, expected)
    np.testing.assert_array_equal(unpack_codes(expected, bits, count), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", LENGTHS)
def test_group_path_matches_reference_for_every_width(
    bits: int, count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The uint64 group path is only dispatched for 3, 5, 6 and 7 bits, but it must be correct
    for any width; a chunk of 2 groups makes every length above 16 cross chunk boundaries."""
    monkeypatch.setattr(packing, "_GROUP_CHUNK", 2)
    codes = random_codes(bits, count)
    expected = reference_pack(codes, bits)
    np.testing.assert_array_equal(packing._pack_groups(codes, bits), expected)
    np.testing.assert_array_equal(packing._unpack_groups(expected, bits, count), codes)


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_group_path_tail_bits_are_zero_and_extremes_survive(bits: int) -> None:
    """All-ones codes fill every stream bit; the unused bits of the last byte must stay 0."""
    count = 8 * 3 + 5
    codes = np.full(count, 2**bits - 1, dtype=np.uint8)
    packed = pack_codes(codes, bits)
    used = count * bits
    assert packed[-1] == (1 << (used - 8 * (packed.size - 1))) - 1
    np.testing.assert_array_equal(packed, reference_pack(codes, bits))
    np.testing.assert_array_equal(unpack_codes(packed, bits, count), codes)


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_group_path_at_default_chunk_boundary(bits: int) -> None:
    """One full default chunk plus an odd tail, compared with NumPy's bit-matrix packing (the
    previous implementation, itself checked against ``reference_pack`` on small inputs)."""
    count = 8 * packing._GROUP_CHUNK + 13
    codes = random_codes(bits, count)
    bit_matrix = np.unpackbits(codes[:, None], axis=1, bitorder="little")[:, :bits]
    expected = np.packbits(bit_matrix.reshape(-1), bitorder="little")
    np.testing.assert_array_equal(reference_pack(codes[:40], bits), expected[: 5 * bits])
    packed = pack_codes(codes, bits)
    np.testing.assert_array_equal(packed, expected)
    np.testing.assert_array_equal(unpack_codes(packed, bits, count), codes)


def test_reference_pack_matches_the_documented_example() -> None:
    """Guards the reference itself: codes 1, 2, 3 at 2 bits form the byte 0b00111001."""
    assert reference_pack(np.array([1, 2, 3], dtype=np.uint8), 2).tolist() == [0b111001]
    # 3 bits: 5 (101), 6 (011 LSB first) -> stream 1,0,1,0,1,1 -> 0b110101
    assert reference_pack(np.array([5, 6], dtype=np.uint8), 3).tolist() == [0b110101]
