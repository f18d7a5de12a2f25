"""Bit packing of k-bit unsigned codes (k = 1..8) into bytes.

Wire format (``pack_codes``): the codes are laid out element after element, each code's k bits
least-significant first, as one bit stream; stream bit p is stored in byte p // 8 at bit position
p % 8 (LSB first, NumPy's ``bitorder="little"``). n codes take exactly ceil(n * k / 8) bytes; unused
bits of the last byte are zero. The count n is not stored: both ends know the tensor shapes.

Built on ``np.unpackbits``/``np.packbits`` (vectorised C loops, no Python loop over elements).
"""

from __future__ import annotations

import numpy as np

MAX_BITS = 8


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits occupy on the wire."""
    _check_bits(bits)
    return -(-count * bits // 8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integer codes in ``[0, 2**bits)`` into a flat ``uint8`` array."""
    _check_bits(bits)
    flat = np.ascontiguousarray(codes).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for {bits}-bit packing")
    flat = flat.astype(np.uint8, copy=False)
    if bits == 8:
        return flat.copy()
    if bits == 1:
        return np.packbits(flat, bitorder="little")
    # (n, 8) bit matrix, LSB first; keep the low ``bits`` columns, then pack the stream.
    bit_matrix = np.unpackbits(flat[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(bit_matrix.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_codes``: ``count`` codes as ``uint8``; checks the byte length exactly."""
    _check_bits(bits)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise ValueError(f"packed codes must be 1-D uint8, got {packed.dtype} {packed.shape}")
    expected = packed_size(count, bits)
    if packed.size != expected:
        raise ValueError(f"{count} codes of {bits} bits need {expected} bytes, got {packed.size}")
    if bits == 8:
        return packed.copy()
    stream = np.unpackbits(packed, count=count * bits, bitorder="little")
    if bits == 1:
        return stream
    bit_matrix = stream.reshape(count, bits)
    # Re-pad each code to 8 bits and let packbits assemble the byte value.
    padded = np.zeros((count, 8), dtype=np.uint8)
    padded[:, :bits] = bit_matrix
    return np.packbits(padded, axis=1, bitorder="little").reshape(-1)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int | np.integer) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
