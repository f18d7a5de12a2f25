"""Wire format of FedBiF messages (pure NumPy; both ends know the model's tensor shapes).

A model's wire tensors split into *quantized* ones (Conv2d/Linear weights) and *extras* (biases,
BatchNorm affine parameters and running statistics). All quantized tensors are flattened in wire
order and concatenated into one vector of d scalars; all extras likewise into one vector of e.
Few large arrays keep the ~128-byte ``.npy`` header per array negligible.

Downlink, server -> client (3 arrays):
    0. uint8  ``pack_codes(words, m)``: the m-bit unsigned word of every quantized scalar,
       ceil(d * m / 8) bytes (``compression.bits`` says how a word encodes the integer);
    1. float32 (L,): the step size alpha_l of each of the L quantized tensors (Eq. 5);
    2. float16 or float32 (e,): the extras.
Uplink, client -> server (2 arrays):
    0. uint8  ``pack_codes(codes, s)``: per quantized scalar, its s activated bits as one s-bit
       code (bit j = the j-th activated position, ascending), ceil(d * s / 8) bytes;
    1. float16 or float32 (e,): the client's trained extras.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from compression.layout import SplitLayout, checked_floats
from compression.packing import pack_codes, unpack_codes

EXTRAS_DTYPES = ("float16", "float32")


def encode_downlink(
    words: np.ndarray, steps: np.ndarray, extras: np.ndarray, bits: int
) -> list[np.ndarray]:
    """Downlink arrays from the concatenated words, per-tensor steps and concatenated extras."""
    return [pack_codes(words, bits), np.asarray(steps, dtype=np.float32), extras]


def decode_downlink(
    arrays: Sequence[np.ndarray], layout: SplitLayout, bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(words (d,), steps (L,), extras (e,) as float32); ``ValueError`` says what is wrong."""
    if len(arrays) != 3:
        raise ValueError(f"FedBiF downlink has 3 arrays, got {len(arrays)}")
    packed, steps, extras = arrays
    words = unpack_codes(packed, bits, layout.num_quantized)
    steps = checked_floats(steps, (len(layout.quantized_shapes),), "steps")
    if np.any(steps <= 0):
        raise ValueError("steps must be positive")
    return words, steps, checked_floats(extras, (layout.num_extras,), "extras")


def encode_uplink(codes: np.ndarray, extras: np.ndarray, active_bits: int) -> list[np.ndarray]:
    """Uplink arrays from the s-bit activated-bit codes (d,) and the extras (e,)."""
    return [pack_codes(codes, active_bits), extras]


def decode_uplink(
    arrays: Sequence[np.ndarray], layout: SplitLayout, active_bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """(codes (d,) uint8, extras (e,) float32); ``ValueError`` says what is wrong."""
    if len(arrays) != 2:
        raise ValueError(f"FedBiF uplink has 2 arrays, got {len(arrays)}")
    packed, extras = arrays
    codes = unpack_codes(packed, active_bits, layout.num_quantized)
    return codes, checked_floats(extras, (layout.num_extras,), "extras")


def spread_codes(codes: np.ndarray, positions: Sequence[int]) -> np.ndarray:
    """Place bit j of each s-bit code at bit ``positions[j]`` of an m-bit word (uint8)."""
    words = np.zeros(codes.shape, dtype=np.uint8)
    for j, position in enumerate(positions):
        words |= ((codes >> j) & 1).astype(np.uint8) << np.uint8(position)
    return words


def gather_codes(words: np.ndarray, positions: Sequence[int]) -> np.ndarray:
    """Inverse of ``spread_codes``: the bits at ``positions`` of each word as an s-bit code."""
    codes = np.zeros(words.shape, dtype=np.uint8)
    for j, position in enumerate(positions):
        codes |= ((words >> np.uint8(position)) & 1).astype(np.uint8) << np.uint8(j)
    return codes
