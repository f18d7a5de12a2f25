"""The lossless entropy stage: exact round trips, byte counts, the raw fallback, hostile streams."""

from __future__ import annotations

import numpy as np
import pytest

from compression import entropy
from compression.packing import packed_size

RNG = np.random.default_rng(20261127)


def distributions(bits: int, n: int) -> dict[str, np.ndarray]:
    top = (1 << bits) - 1
    outlier = np.zeros(n, np.uint8)
    outlier[n // 2] = top
    geometric = np.minimum(RNG.geometric(0.6, n) - 1, top).astype(np.uint8)
    return {
        "empty": np.zeros(0, np.uint8),
        "one symbol": np.full(n, top, np.uint8),
        "uniform": RNG.integers(0, top + 1, n).astype(np.uint8),
        "single outlier": outlier,
        "geometric": geometric,
        "single element": np.array([top], np.uint8),
    }


@pytest.mark.parametrize("bits", range(1, 9))
def test_every_distribution_round_trips_exactly(bits):
    for name, symbols in distributions(bits, 5_003).items():
        stream = entropy.encode(symbols, bits)
        assert stream.dtype == np.uint8 and stream.ndim == 1
        np.testing.assert_array_equal(entropy.decode(stream, bits, symbols.size), symbols, name)
        # Never more than the raw packing plus the header: the fallback caps the cost.
        assert stream.size <= entropy.HEADER_BYTES + packed_size(symbols.size, bits), name


def test_skewed_codes_are_coded_near_their_entropy_and_uniform_ones_stay_raw():
    bits, n = 4, 200_000
    skewed = np.minimum(RNG.geometric(0.5, n) - 1, 15).astype(np.uint8)
    stream = entropy.encode(skewed, bits)
    assert stream[4] == entropy.ANS
    payload_bits = 8 * (stream.size - entropy.HEADER_BYTES - entropy.model_bytes(bits)) / n
    assert payload_bits <= entropy.entropy_bits(skewed, bits) + 0.01  # ANS: within 0.01 bit
    assert 8 * stream.size / n < 0.55 * bits  # about 2 bits of 4
    uniform = RNG.integers(0, 16, n).astype(np.uint8)
    raw = entropy.encode(uniform, bits)
    assert raw[4] == entropy.RAW and raw.size == entropy.HEADER_BYTES + packed_size(n, bits)


def test_the_header_must_match_the_receivers_layout_before_decoding():
    symbols = np.minimum(RNG.geometric(0.5, 10_000) - 1, 15).astype(np.uint8)
    stream = entropy.encode(symbols, 4)
    with pytest.raises(entropy.EntropyError, match="claims 10000 symbols of 4 bits"):
        entropy.decode(stream, 4, 9_999)
    with pytest.raises(entropy.EntropyError, match="the layout has 10000 of 8"):
        entropy.decode(stream, 8, 10_000)
    inflated = stream.copy()
    inflated[6:10] = np.frombuffer((10**9).to_bytes(4, "little"), np.uint8)
    with pytest.raises(entropy.EntropyError, match="claims 1000000000 symbols"):
        entropy.decode(inflated, 4, 10_000)


@pytest.mark.parametrize("mode", [entropy.ANS, entropy.RAW])
def test_corrupt_and_truncated_streams_are_rejected(mode):
    n = 20_000
    symbols = (
        np.minimum(RNG.geometric(0.5, n) - 1, 15).astype(np.uint8)
        if mode == entropy.ANS
        else RNG.integers(0, 16, n).astype(np.uint8)
    )
    stream = entropy.encode(symbols, 4)
    assert stream[4] == mode
    for position in RNG.integers(entropy.HEADER_BYTES, stream.size, 40):  # 40 single-bit flips
        corrupt = stream.copy()
        corrupt[position] ^= np.uint8(1 << int(RNG.integers(0, 8)))
        with pytest.raises(entropy.EntropyError):
            entropy.decode(corrupt, 4, n)
    for cut in (1, 3, 4, stream.size - entropy.HEADER_BYTES):
        with pytest.raises(entropy.EntropyError):
            entropy.decode(stream[:-cut], 4, n)
    with pytest.raises(entropy.EntropyError):
        entropy.decode(np.concatenate([stream, np.zeros(4, np.uint8)]), 4, n)


def test_hostile_headers_and_dtypes_are_refused():
    stream = entropy.encode(np.zeros(1000, np.uint8), 2)
    with pytest.raises(entropy.EntropyError, match="1-D uint8"):
        entropy.decode(stream.astype(np.int16), 2, 1000)
    with pytest.raises(entropy.EntropyError, match="no valid header"):
        entropy.decode(stream[:5], 2, 1000)
    bad_mode = stream.copy()
    bad_mode[4] = 7
    with pytest.raises(entropy.EntropyError, match="unknown entropy mode"):
        entropy.decode(bad_mode, 2, 1000)
    # A model of all zeros would let the coder invent symbols: refused.
    skewed = np.minimum(RNG.geometric(0.7, 50_000) - 1, 255).astype(np.uint8)
    ans = entropy.encode(skewed, 8)
    assert ans[4] == entropy.ANS
    zero_model = ans.copy()
    zero_model[entropy.HEADER_BYTES : entropy.HEADER_BYTES + entropy.model_bytes(8)] = 0
    with pytest.raises(entropy.EntropyError, match="zero weight"):
        entropy.decode(zero_model, 8, skewed.size)


def test_out_of_range_symbols_are_refused_by_the_encoder():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        entropy.encode(np.array([0, 4], np.uint8), 2)
    with pytest.raises(ValueError, match="1..8 bits"):
        entropy.encode(np.zeros(3, np.uint8), 9)


def test_frequencies_keep_every_present_symbol():
    symbols = np.concatenate([np.zeros(10**6, np.uint8), np.array([3], np.uint8)])
    freqs = entropy.frequencies(symbols, 2)
    assert freqs.dtype == np.uint16 and freqs[0] == 0xFFFF and freqs[3] == 1 and freqs[1] == 0
    np.testing.assert_array_equal(
        entropy.decode(entropy.encode(symbols, 2), 2, symbols.size), symbols
    )
