"""Wire format of LBI-FL weight messages (both directions; pure NumPy/torch, no Flower).

Tensors split as ``compression.layout.SplitLayout``: *quantized* tensors (Conv2d/Linear weights,
L of them, d scalars) and *extras* (biases, BatchNorm parameters and statistics, e scalars),
concatenated in wire order, so a message (``LBIWeightCodec``) is three ``.npy`` arrays whatever
the model depth:

    0. uint8 ``pack_codes(u, k)``: u = c + (2^(k-1) - 1) for the signed code c in
       [-(2^(k-1) - 1), 2^(k-1) - 1] of every quantized scalar (value = c * s), ceil(d k / 8) B;
       with ``entropy=ans``, a ``compression.entropy`` stream of the same u instead;
    1. float32 (1 + S,): k, then the scales in wire order: one per output channel of every
       tensor (S = C = the sum of the tensors' first dimensions, s = max|w_channel| /
       (2^(k-1) - 1)), or, with per-tensor scales (the paper's), one per tensor (S = L);
    2. float16 or float32 (e,): the extras.

The width travels in the message, so a receiver never decodes with a width it guessed; the
server also checks it against the width the client reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from compression import entropy, reference
from compression.codec import Codec
from compression.layout import SplitLayout, checked_floats
from compression.packing import packed_size
from compression.primitives import (
    channel_scale,
    grid,
    max_abs_scale,
    quantize_nearest,
    stochastic_round,
)

ROUNDINGS = ("stochastic", "nearest")
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class WeightMessage:
    """Width k, signed codes (d,) int8 on the symmetric k-bit grid, scales (C,), extras (e,)."""

    bits: int
    codes: np.ndarray
    scales: np.ndarray
    extras: np.ndarray
    #: unsigned codes (``unsigned_codes``) of a message the receiver holds, at the same width,
    #: that the codes are sent against (reference coding; None: full codes).
    basis: reference.Basis | None = None


def unsigned_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Signed k-bit codes as the uint8 symbols on the wire (code + 2^(k-1) - 1)."""
    return (np.asarray(codes).astype(np.int16) + grid(bits, signed=True)[1]).astype(np.uint8)


def quantize_weights(
    tensors: Sequence[np.ndarray],
    bits: int,
    rounding: str,
    generator: torch.Generator | None = None,
    grid_scales: Sequence[float] | None = None,
    per_channel: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Signed codes (d,) int8 and scales float32 on the symmetric k-bit grid: one per output
    channel (C,), or with ``per_channel=False`` one per tensor (L,).

    ``stochastic`` rounding keeps E[decoded] = weights, so averaging many clients' messages does
    not lose updates smaller than half a step; ``nearest`` is the training-forward quantizer.
    ``grid_scales``: scales (as returned) to keep where they still cover max|w| (a client passes
    those of the message it received: weights that did not move then come back exactly, and
    only the change is rounded); a channel or tensor that grew takes its own max-abs scale.
    """
    _check_bits(bits)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    low, high = grid(bits, signed=True)
    codes, scales = [], []
    counts = [int(np.shape(array)[0]) if per_channel else 1 for array in tensors]
    if grid_scales is not None and len(grid_scales) != sum(counts):
        raise ValueError(f"{len(grid_scales)} grid scales for {sum(counts)} scales")
    offsets = np.cumsum([0, *counts])
    for index, array in enumerate(tensors):
        weights = torch.from_numpy(np.asarray(array, dtype=np.float32))
        scale = (
            channel_scale(weights, bits)
            if per_channel
            else max_abs_scale(weights, bits, signed=True).reshape([1] * weights.dim())
        )
        if grid_scales is not None:
            kept = np.asarray(grid_scales[offsets[index] : offsets[index + 1]], dtype=np.float32)
            scale = torch.maximum(scale, torch.from_numpy(kept).reshape(scale.shape))
        if rounding == "nearest":
            code = quantize_nearest(weights, scale, bits, signed=True)
        else:
            code = torch.clamp(stochastic_round(weights / scale, generator), low, high)
        codes.append(code.reshape(-1).to(torch.int8).numpy())
        scales.append(scale.reshape(-1).numpy())
    flat = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int8)
    return flat, np.concatenate(scales).astype(np.float32) if scales else np.zeros(0, np.float32)


@dataclass(frozen=True)
class LBIWeightCodec(Codec[WeightMessage]):
    """The k_w-bit weight message (both directions); the width travels in array 1.

    ``extras_dtype`` is the extras' dtype, sent and required on receipt (a float32 upload under
    a float16 run could hold values whose mean overflows the float16 downlink); ``per_channel``
    says whether a scale covers an output channel or a whole tensor.
    """

    split: SplitLayout
    extras_dtype: str = "float16"
    per_channel: bool = True
    #: ``ans``: array 0 is a ``compression.entropy`` stream of the codes instead of packed bits.
    entropy: str = "none"
    #: a ``compression.reference`` header first; codes may be sent against a held basis.
    reference: bool = False
    name = "an LBI-FL message"

    @property
    def num_arrays(self) -> int:  # type: ignore[override]
        return 4 if self.reference else 3

    def encode(self, message: WeightMessage) -> list[np.ndarray]:
        bits = message.bits
        _check_bits(bits)
        split = self.split
        if message.codes.shape != (split.num_quantized,) or message.scales.shape != (
            num_scales(split, self.per_channel),
        ):
            raise ValueError("codes/scales do not match the layout")
        symbols = reference.symbols_against(
            unsigned_codes(message.codes, bits), message.basis, bits, self.reference
        )
        side = np.concatenate(
            [np.asarray([bits], dtype=np.float32), message.scales.astype(np.float32)]
        )
        extras = np.asarray(message.extras).astype(self.extras_dtype, copy=False)
        arrays = [entropy.pack(symbols, bits, self.entropy), side, extras]
        return reference.framed(arrays, message.basis, self.reference)

    def _decode(self, arrays: list[np.ndarray]) -> WeightMessage:
        return self.decode_with(arrays, None)

    def decode_with(
        self, arrays: Sequence[np.ndarray], held: reference.Basis | None
    ) -> WeightMessage:
        """``decode`` for a receiver holding ``held`` (unsigned codes of a message it sent or
        received), which a reference-coded message names in its header."""
        basis_round, crc, arrays = reference.take_header(
            arrays, self.num_arrays, self.name, self.reference
        )
        packed, side, extras = arrays
        split = self.split
        side = checked_floats(
            side, (1 + num_scales(split, self.per_channel),), "width/scales", ("float32",)
        )
        bits = float(side[0])
        if not bits.is_integer() or not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(
                f"weight width must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits}"
            )
        bits_int = int(bits)
        scales = side[1:]
        if np.any(scales <= 0):
            raise ValueError("scales must be positive")
        unsigned = entropy.unpack(packed, bits_int, split.num_quantized, self.entropy)
        unsigned = reference.resolve(unsigned, basis_round, crc, held, bits_int)
        offset = grid(bits_int, signed=True)[1]
        if unsigned.size and int(unsigned.max()) > 2 * offset:
            raise ValueError(
                f"code {int(unsigned.max())} outside the {bits_int}-bit symmetric grid"
            )
        codes = (unsigned.astype(np.int16) - offset).astype(np.int8)
        extras = checked_floats(extras, (split.num_extras,), "extras", (self.extras_dtype,))
        return WeightMessage(bits=bits_int, codes=codes, scales=scales, extras=extras)

    def payload_nbytes(self, message: WeightMessage) -> int:
        """Bytes of the arrays; with ``entropy=ans`` or a basis the size is ``message``'s own."""
        if self.entropy == "ans" or message.basis is not None:
            return sum(a.nbytes for a in self.encode(message))
        return (
            reference.HEADER_BYTES * self.reference
            + packed_size(self.split.num_quantized, message.bits)
            + 4 * (1 + num_scales(self.split, self.per_channel))
            + self.split.num_extras * np.dtype(self.extras_dtype).itemsize
        )


def dequantize(message: WeightMessage, split: SplitLayout) -> list[np.ndarray]:
    """The float32 weight tensors (in their shapes) a message's codes and scales stand for
    (per-channel or per-tensor scales, told apart by their count)."""
    signed = message.codes.astype(np.float32)
    shapes = split.quantized_shapes
    pieces = np.split(signed, np.cumsum(split.quantized_sizes)[:-1]) if shapes else []
    scales = message.scales
    if scales.size == len(shapes) and scales.size != num_channels(split):
        scales = np.repeat(scales, [s[0] for s in shapes])  # one scale per tensor
    scale_pieces = np.split(scales, np.cumsum([s[0] for s in shapes])[:-1]) if shapes else []
    return [
        (piece.reshape(shape[0], -1) * scale[:, None]).reshape(shape)
        for piece, scale, shape in zip(pieces, scale_pieces, shapes, strict=True)
    ]


def num_channels(split: SplitLayout) -> int:
    """C: the output channels of every quantized tensor (per-channel scales)."""
    return sum(shape[0] for shape in split.quantized_shapes)


def num_scales(split: SplitLayout, per_channel: bool) -> int:
    """Scales in a message: C per channel, L per tensor."""
    return num_channels(split) if per_channel else len(split.quantized_shapes)


def _check_bits(bits: int) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"weight width must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
