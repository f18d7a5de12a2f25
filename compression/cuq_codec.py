"""Wire format of clipped-uniform-quantization messages (pure NumPy; both ends know the shapes).

The wire tensors split as in ``compression.layout.SplitLayout``: *quantized* tensors
(Conv2d/Linear weights, L of them, d scalars in all) and *extras* (biases, BatchNorm parameters
and running statistics, e scalars). Everything is concatenated in wire order so that a message is
three ``.npy`` arrays whatever the model depth (~128 bytes of header each).

Uplink, client -> server (3 arrays, ``CuqCodec`` with ``with_errors``):
    0. uint8  ``pack_codes(codes, B)``: the B-bit code u of every quantized scalar
       (value = -s + u * 2s / (2^B - 1), ``compression.clipped_quant``), ceil(d * B / 8) bytes;
    1. float32 (c + L,): the c clips s (c = L per layer, or the sum of the output-channel counts
       per channel, in wire order), then the L per-tensor squared quantization errors;
    2. float16 or float32 (e,): the client's trained extras.
Downlink, server -> client, only when ``cuq-downlink-bits`` B' > 0 (otherwise the fp32 wire
state): the same three arrays with B' bits, array 1 holding the c clips only (no errors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from compression.clipped_quant import clipped_dequantize, quantize_tensor
from compression.clipping import num_clips
from compression.codec import Codec
from compression.layout import EXTRAS_DTYPES, SplitLayout, checked_floats
from compression.packing import pack_codes, packed_size, unpack_codes


@dataclass(frozen=True)
class CuqLayout:
    """Shapes, bits and clip granularity of one direction's messages."""

    split: SplitLayout
    bits: int
    granularity: str

    @property
    def clip_counts(self) -> list[int]:
        return [num_clips(shape, self.granularity) for shape in self.split.quantized_shapes]

    @property
    def num_clips(self) -> int:
        return sum(self.clip_counts)

    @property
    def num_layers(self) -> int:
        return len(self.split.quantized_shapes)


@dataclass(frozen=True)
class CuqMessage:
    """A decoded message: codes (d,) uint8, clips (c,) / errors (L,) / extras (e,) float32."""

    codes: np.ndarray
    clips: np.ndarray
    errors: np.ndarray | None
    extras: np.ndarray


@dataclass(frozen=True)
class CuqCodec(Codec[CuqMessage]):
    """One direction's messages: ``with_errors`` for the uplink (clips then SQEs in array 1)."""

    layout: CuqLayout
    with_errors: bool
    extras_dtype: str = "float16"
    name = "a clipped-uq message"
    num_arrays = 3

    @property
    def side_size(self) -> int:
        return self.layout.num_clips + (self.layout.num_layers if self.with_errors else 0)

    def encode(self, message: CuqMessage) -> list[np.ndarray]:
        side = np.asarray(message.clips, dtype=np.float32).reshape(-1)
        if self.with_errors:
            if message.errors is None:
                raise ValueError("an uplink message carries its squared errors")
            errors = np.asarray(message.errors, dtype=np.float32).reshape(-1)
            side = np.concatenate([side, errors])
        return [
            pack_codes(message.codes, self.layout.bits),
            side,
            np.asarray(message.extras).astype(self.extras_dtype, copy=False),
        ]

    def _decode(self, arrays: list[np.ndarray]) -> CuqMessage:
        packed, side, extras = arrays
        layout = self.layout
        codes = unpack_codes(packed, layout.bits, layout.split.num_quantized)
        side = checked_floats(side, (self.side_size,), "clips/errors", ("float32",))
        clips = side[: layout.num_clips]
        if np.any(clips <= 0):
            raise ValueError("clips must be positive")
        errors = side[layout.num_clips :] if self.with_errors else None
        if errors is not None and np.any(errors < 0):
            raise ValueError("squared errors must be non-negative")
        extras = checked_floats(extras, (layout.split.num_extras,), "extras", EXTRAS_DTYPES)
        return CuqMessage(codes=codes, clips=clips, errors=errors, extras=extras)

    def payload_nbytes(self, message: CuqMessage | None = None) -> int:
        return (
            packed_size(self.layout.split.num_quantized, self.layout.bits)
            + 4 * self.side_size
            + self.layout.split.num_extras * np.dtype(self.extras_dtype).itemsize
        )


def quantize_layers(
    tensors: Sequence[np.ndarray],
    layout: CuqLayout,
    rounding: str,
    generator: torch.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """Quantize every quantized tensor with its optimal clip(s).

    Returns the concatenated codes (d,) uint8, clips (c,) float32, per-tensor SQE (L,) float64
    and the dequantized tensors (what the receiver will reconstruct, float32).
    """
    codes, clips, errors, restored = [], [], [], []
    for array in tensors:
        clip, code, x_hat, error = quantize_tensor(
            torch.from_numpy(np.asarray(array, dtype=np.float32)),
            layout.bits,
            rounding=rounding,
            granularity=layout.granularity,
            generator=generator,
        )
        codes.append(code.reshape(-1).numpy())
        clips.append(clip.numpy())
        errors.append(error)
        restored.append(x_hat.numpy())
    return (
        np.concatenate(codes) if codes else np.zeros(0, dtype=np.uint8),
        np.concatenate(clips).astype(np.float32) if clips else np.zeros(0, dtype=np.float32),
        np.asarray(errors, dtype=np.float64),
        restored,
    )


def dequantize_layers(message: CuqMessage, layout: CuqLayout) -> list[np.ndarray]:
    """The float32 tensors (in their shapes) that a message's codes and clips stand for."""
    shapes = layout.split.quantized_shapes
    code_pieces = np.split(message.codes, np.cumsum(layout.split.quantized_sizes)[:-1])
    clip_pieces = np.split(message.clips, np.cumsum(layout.clip_counts)[:-1])
    return [
        clipped_dequantize(
            torch.from_numpy(code.reshape(shape)), torch.from_numpy(clip), layout.bits
        ).numpy()
        for code, clip, shape in zip(code_pieces, clip_pieces, shapes, strict=True)
    ]
