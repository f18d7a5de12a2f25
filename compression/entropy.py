"""Lossless entropy stage for packed k-bit codes: an adaptive ANS stream or the raw packing.

Quantized codes are far from uniform (QSGD's levels are mostly 0 and 1, FedBiF's m-bit weights
bunch around the middle), so sending them at their nominal width wastes bits. This stage codes
one array of k-bit symbols (k = 1..8) with an asymmetric numeral system (``constriction``'s
``AnsCoder``, a well-kept Rust coder) under a per-array categorical model whose description is
sent and counted; when that does not beat the raw packing, the raw packing is sent instead.

Wire format (one flat ``uint8`` array, little-endian):

====================  =========================================================================
bytes                 content
====================  =========================================================================
0..3                  magic ``b"EC1\\0"``
4                     mode: 0 = raw (``compression.packing``), 1 = ANS
5                     k, the symbol width in bits (must equal what the receiver expects)
6..9                  n, the number of symbols (uint32; must equal the receiver's layout)
10..13                CRC-32 of the n symbols as uint8 (detects a corrupt stream after decoding)
raw: 14..             ``pack_codes(symbols, k)``: exactly ceil(n k / 8) bytes
ANS: 14..14+2K-1      the model: K = 2**k symbol frequencies as uint16 (0 = absent)
ANS: 14+2K..          the ANS words (uint32), at most as many bytes as the raw packing
====================  =========================================================================

Both ends build the model from the same uint16 frequencies, so they agree bit for bit. The
receiver refuses a stream whose header disagrees with its layout before decoding anything (a
stream claiming more symbols than the layout has never reaches the decoder), a model that gives
zero weight to every symbol, a payload longer than the raw packing, and a stream whose decoded
symbols fail the CRC or leave words unread.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from compression.packing import MAX_BITS, pack_codes, packed_size, unpack_codes

MAGIC = b"EC1\x00"
RAW, ANS = 0, 1
HEADER_BYTES = 14
_FREQ_MAX = 0xFFFF


@dataclass(frozen=True)
class StreamRecord:
    """One coded stream as ``recording`` saw it: what was coded against what it cost."""

    bits: int  # symbol width k
    count: int  # symbols
    entropy_bits: float  # count x the symbols' empirical (order-0) entropy: the stream's limit
    coded_bytes: int  # payload: the ANS model and words, or the raw packing
    header_bytes: int  # the stream's own header (HEADER_BYTES)
    mode: str  # "ans" or "raw"
    digest: int  # CRC-32 of the whole stream: which sent array it is


_RECORDERS: list[list[StreamRecord]] = []


@contextmanager
def recording() -> Iterator[list[StreamRecord]]:
    """Collect a ``StreamRecord`` for every ``encode`` inside the block (benchmarks: how far
    each message is from the entropy of what it codes). Costs a histogram per stream."""
    records: list[StreamRecord] = []
    _RECORDERS.append(records)
    try:
        yield records
    finally:
        _RECORDERS.remove(records)


def _record(flat: np.ndarray, bits: int, stream: np.ndarray) -> None:
    record = StreamRecord(
        bits,
        int(flat.size),
        entropy_bits(flat, bits) * flat.size,
        int(stream.size) - HEADER_BYTES,
        HEADER_BYTES,
        "ans" if stream.size > 4 and stream[4] == ANS else "raw",
        zlib.crc32(stream.tobytes()),
    )
    for records in _RECORDERS:
        records.append(record)


class EntropyError(ValueError):
    """A stream the receiver cannot accept (malformed, corrupt or not what the layout says)."""


def model_bytes(bits: int) -> int:
    """Bytes of the model description of a ``bits``-bit alphabet (counted in the payload)."""
    return 2 * (1 << bits)


def frequencies(symbols: np.ndarray, bits: int) -> np.ndarray:
    """The sent model: symbol counts scaled into uint16, every present symbol at least 1."""
    counts = np.bincount(symbols, minlength=1 << bits).astype(np.int64)
    if counts.max(initial=0) <= _FREQ_MAX:
        return counts.astype(np.uint16)
    scaled = counts * _FREQ_MAX // counts.max()  # integer: the largest count maps to 0xFFFF
    scaled[(counts > 0) & (scaled == 0)] = 1
    return scaled.astype(np.uint16)


def _categorical(freqs: np.ndarray):  # noqa: ANN202 - constriction's model type
    import constriction

    return constriction.stream.model.Categorical(freqs.astype(np.float64), perfect=False)


def _header(mode: int, bits: int, count: int, crc: int) -> bytes:
    return (
        MAGIC
        + bytes([mode, bits])
        + int(count).to_bytes(4, "little")
        + int(crc).to_bytes(4, "little")
    )


def encode(symbols: np.ndarray, bits: int) -> np.ndarray:
    """Code ``symbols`` (integers in ``[0, 2**bits)``) losslessly; the smaller of ANS and raw.

    The raw packing is built only when it is sent: when the model alone costs more than it,
    or when the ANS words do not beat it (rare for codes worth coding)."""
    stream = _encode(symbols, bits)
    if _RECORDERS:
        _record(np.ascontiguousarray(symbols).reshape(-1).astype(np.uint8), bits, stream)
    return stream


def _encode(symbols: np.ndarray, bits: int) -> np.ndarray:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"symbol width must be 1..{MAX_BITS} bits, got {bits}")
    flat = np.ascontiguousarray(symbols).reshape(-1)
    signed = not np.issubdtype(flat.dtype, np.unsignedinteger) and flat.dtype != np.bool_
    if flat.size and ((signed and flat.min() < 0) or flat.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit coding")
    flat = flat.astype(np.uint8, copy=False)
    crc = zlib.crc32(flat.tobytes())
    raw_size = packed_size(flat.size, bits)

    def raw() -> np.ndarray:
        header = np.frombuffer(_header(RAW, bits, flat.size, crc), np.uint8)
        return np.concatenate([header, pack_codes(flat, bits)])

    if flat.size == 0 or model_bytes(bits) >= raw_size:  # the model alone costs more
        return raw()
    freqs = frequencies(flat, bits)
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(flat.astype(np.int32), _categorical(freqs))
    words = coder.get_compressed().astype("<u4", copy=False)
    if model_bytes(bits) + words.nbytes >= raw_size:
        return raw()
    return np.concatenate(
        [
            np.frombuffer(_header(ANS, bits, flat.size, crc), np.uint8),
            freqs.astype("<u2").view(np.uint8),
            words.view(np.uint8),
        ]
    )


def decode(stream: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` symbols of ``stream`` as ``uint8``; ``EntropyError`` on anything unexpected."""
    stream = np.asarray(stream)
    if stream.dtype != np.uint8 or stream.ndim != 1:
        raise EntropyError(f"entropy stream must be 1-D uint8, got {stream.dtype} {stream.shape}")
    if stream.size < HEADER_BYTES or stream[:4].tobytes() != MAGIC:
        raise EntropyError("entropy stream has no valid header")
    mode, got_bits = int(stream[4]), int(stream[5])
    got_count = int.from_bytes(stream[6:10].tobytes(), "little")
    crc = int.from_bytes(stream[10:14].tobytes(), "little")
    if got_bits != bits or got_count != count:
        raise EntropyError(
            f"entropy stream claims {got_count} symbols of {got_bits} bits, "
            f"the layout has {count} of {bits}"
        )
    body = stream[HEADER_BYTES:]
    raw_size = packed_size(count, bits)
    if mode == RAW:
        try:
            symbols = unpack_codes(body, bits, count)
        except ValueError as err:
            raise EntropyError(f"raw entropy stream: {err}") from err
    elif mode == ANS:
        symbols = _decode_ans(body, bits, count, raw_size)
    else:
        raise EntropyError(f"unknown entropy mode {mode}")
    if zlib.crc32(symbols.tobytes()) != crc:
        raise EntropyError("entropy stream is corrupt (CRC mismatch)")
    return symbols


def _decode_ans(body: np.ndarray, bits: int, count: int, raw_size: int) -> np.ndarray:
    model_size = model_bytes(bits)
    words_size = body.size - model_size
    if words_size <= 0 or words_size % 4 or body.size >= raw_size:
        raise EntropyError(
            f"ANS payload of {body.size} bytes is malformed (model {model_size} bytes, words in "
            f"4-byte units, less than the raw {raw_size} bytes)"
        )
    freqs = body[:model_size].view("<u2").astype(np.float64)
    present = freqs > 0
    if not present.any():
        raise EntropyError("ANS model gives every symbol zero weight")
    import constriction

    words = body[model_size:].view("<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        symbols = coder.decode(_categorical(freqs), count)
    except Exception as err:  # noqa: BLE001 - the coder's own errors on a hostile stream
        raise EntropyError(f"ANS stream does not decode: {err}") from err
    if not coder.is_empty():
        raise EntropyError("ANS stream has words left after the layout's symbols")
    symbols = np.asarray(symbols)
    # A symbol of zero frequency has no interval in the coder, so it can never be decoded;
    # the CRC in ``decode`` checks the symbols themselves.
    if symbols.size != count:
        raise EntropyError(f"ANS stream decodes to {symbols.size} symbols, not {count}")
    return symbols.astype(np.uint8)


def entropy_bits(symbols: np.ndarray, bits: int) -> float:
    """Empirical entropy of ``symbols`` in bits per symbol (the bound the ANS stream nears)."""
    counts = np.bincount(np.asarray(symbols).reshape(-1), minlength=1 << bits)
    p = counts[counts > 0] / max(1, counts.sum())
    return float(-(p * np.log2(p)).sum())


def pack(codes: np.ndarray, bits: int, mode: str) -> np.ndarray:
    """A codec's code array on the wire: ``pack_codes`` (``none``) or an ``encode`` stream."""
    if mode == "ans":
        return encode(codes, bits)
    if mode != "none":
        raise ValueError(f"entropy must be 'none' or 'ans', got {mode!r}")
    return pack_codes(codes, bits)


def unpack(array: np.ndarray, bits: int, count: int, mode: str) -> np.ndarray:
    """Inverse of ``pack``: ``count`` codes as uint8; ``ValueError`` on a malformed array."""
    if mode == "ans":
        return decode(array, bits, count)
    if mode != "none":
        raise ValueError(f"entropy must be 'none' or 'ans', got {mode!r}")
    return unpack_codes(array, bits, count)
