"""Bit packing of k-bit unsigned codes (k = 1..8) into bytes.

Wire format (``pack_codes``): the codes are laid out element after element, each code's k bits
least-significant first, as one bit stream; stream bit p is stored in byte p // 8 at bit position
p % 8 (LSB first, NumPy's ``bitorder="little"``). n codes take exactly ceil(n * k / 8) bytes; unused
bits of the last byte are zero. The count n is not stored: both ends know the tensor shapes.

Three vectorised paths, all producing that one format (no Python loop over elements):

* 1 bit: ``np.packbits``/``np.unpackbits`` themselves;
* 2 and 4 bits: whole codes per byte, shifted into place (8 / k shifts per byte slot);
* 3, 5, 6 and 7 bits: 8 codes of k bits are exactly k bytes, so each group of 8 codes is
  assembled into one little-endian uint64 word (8 shifts) whose low k bytes are the group's
  bytes; worked in cache-sized chunks. This replaced a (n, 8) bit matrix through
  ``np.unpackbits``/``np.packbits`` that was 10-20x slower (``benchmarks/packing_speed.py``).
"""

from __future__ import annotations

import numpy as np

MAX_BITS = 8
# Groups of 8 codes per chunk of the uint64 path: 64k groups = 512 KiB of words, which stays in
# the L2 cache while the 8 shift-or passes run over it (measured ~2x faster than one pass over a
# whole resnet18-sized vector).
_GROUP_CHUNK = 1 << 16
_WORD = np.dtype("<u8")  # little-endian on every host, so the byte order of a word is the wire's


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits occupy on the wire."""
    _check_bits(bits)
    return -(-count * bits // 8)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integer codes in ``[0, 2**bits)`` into a flat ``uint8`` array."""
    _check_bits(bits)
    flat = np.ascontiguousarray(codes).reshape(-1)
    # Unsigned codes cannot be negative: skipping min() saves a pass (a third of 1-bit packing).
    signed = not np.issubdtype(flat.dtype, np.unsignedinteger) and flat.dtype != np.bool_
    if flat.size and ((signed and flat.min() < 0) or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for {bits}-bit packing")
    flat = flat.astype(np.uint8, copy=False)
    if bits == 8:
        return flat.copy()
    if bits == 1:
        return np.packbits(flat, bitorder="little")
    if 8 % bits == 0:  # 2 or 4 bits: whole codes per byte, shifted into place (no bit matrix)
        per_byte = 8 // bits
        padded = np.zeros(-(-flat.size // per_byte) * per_byte, dtype=np.uint8)
        padded[: flat.size] = flat
        packed = padded[0::per_byte].copy()
        for slot in range(1, per_byte):  # at most 4 slots: a loop over positions, not elements
            packed |= padded[slot::per_byte] << np.uint8(slot * bits)
        return packed
    return _pack_groups(flat, bits)


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
    if bits == 1:
        return np.unpackbits(packed, count=count, bitorder="little")
    if 8 % bits == 0:
        per_byte, mask = 8 // bits, np.uint8(2**bits - 1)
        codes = np.empty(packed.size * per_byte, dtype=np.uint8)
        for slot in range(per_byte):
            codes[slot::per_byte] = (packed >> np.uint8(slot * bits)) & mask
        return codes[:count]
    return _unpack_groups(packed, bits, count)


def _pack_groups(flat: np.ndarray, bits: int) -> np.ndarray:
    """Any width 1..8: code j of a group of 8 goes to bits [j * k, (j + 1) * k) of a uint64 word;
    the word's low k bytes (little-endian) are exactly the group's k stream bytes."""
    count = flat.size
    groups = -(-count // 8)
    padded = np.zeros(groups * 8, dtype=np.uint8)  # zero codes past the end: zero tail bits
    padded[:count] = flat
    grouped = padded.reshape(groups, 8)
    out = np.empty((groups, bits), dtype=np.uint8)
    size = min(_GROUP_CHUNK, groups)
    word, shifted = np.empty(size, dtype=_WORD), np.empty(size, dtype=_WORD)
    for start in range(0, groups, _GROUP_CHUNK):
        stop = min(start + _GROUP_CHUNK, groups)
        w, t = word[: stop - start], shifted[: stop - start]
        np.copyto(w, grouped[start:stop, 0], casting="unsafe")
        for j in range(1, 8):
            np.copyto(t, grouped[start:stop, j], casting="unsafe")
            t <<= np.uint64(j * bits)
            w |= t
        out[start:stop] = w.view(np.uint8).reshape(-1, 8)[:, :bits]
    return out.reshape(-1)[: packed_size(count, bits)].copy()


def _unpack_groups(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``_pack_groups``: k stream bytes are zero-extended to one uint64 word, from
    which 8 codes are shifted out."""
    groups = -(-count // 8)
    stream = np.zeros(groups * bits, dtype=np.uint8)
    stream[: packed.size] = packed
    stream = stream.reshape(groups, bits)
    codes = np.empty((groups, 8), dtype=np.uint8)
    mask = np.uint64(2**bits - 1)
    size = min(_GROUP_CHUNK, groups)
    buffer = np.zeros((size, 8), dtype=np.uint8)  # bytes k..7 stay zero
    shifted = np.empty(size, dtype=_WORD)
    for start in range(0, groups, _GROUP_CHUNK):
        stop = min(start + _GROUP_CHUNK, groups)
        rows = buffer[: stop - start]
        rows[:, :bits] = stream[start:stop]
        word, t = rows.reshape(-1).view(_WORD), shifted[: stop - start]
        for j in range(8):
            np.right_shift(word, np.uint64(j * bits), out=t)
            t &= mask
            codes[start:stop, j] = t
    return codes.reshape(-1)[:count]


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int | np.integer) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
