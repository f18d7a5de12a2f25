"""Wire format of clipped-uniform-quantization messages (pure NumPy; both ends know the shapes).

The wire tensors split as in ``compression.layout.SplitLayout``: *quantized* tensors
(Conv2d/Linear weights, L of them, d scalars in all) and *extras* (biases, BatchNorm parameters
and running statistics, e scalars). Everything is concatenated in wire order so that a message is
three ``.npy`` arrays whatever the model depth (~128 bytes of header each).

Uplink, client -> server (3 arrays, ``CuqCodec`` with ``with_errors``):
    0. uint8: the B_l-bit code u of every quantized scalar (value = -s + u * 2s / (2^B_l - 1),
       ``compression.clipped_quant``): ``pack_codes(codes, B)`` over all d scalars,
       ceil(d * B / 8) bytes, when every tensor has the same width B; with per-tensor widths
       B_l, tensor after tensor, each ``pack_codes(codes_l, B_l)`` (ceil(d_l * B_l / 8) bytes);
       with ``entropy=ans``, one ``compression.entropy`` stream of all d codes over the widest
       width's alphabet (each tensor's codes checked against its own width on receipt);
    1. float32 (c + L,): the c clips s (c = L per layer, or the sum of the output-channel counts
       per channel, in wire order; each in (0, ``CLIP_LIMIT``]), then the L per-tensor squared
       quantization errors (>= 0);
    2. float16 or float32 (e,): the client's trained extras.
Downlink, server -> client, only when ``cuq-downlink-bits`` B' > 0 (otherwise the fp32 wire
state): the same three arrays with B' bits, array 1 holding the c clips only (no errors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from compression import entropy
from compression.clipped_quant import clipped_dequantize, quantize_tensor
from compression.clipping import num_clips
from compression.codec import Codec
from compression.layout import SplitLayout, checked_floats
from compression.packing import pack_codes, packed_size, unpack_codes

#: the largest clip a message may carry: the grid spans [-clip, clip], and 2 x clip must stay
#: a finite float32.
CLIP_LIMIT = float(np.finfo(np.float32).max) / 2


@dataclass(frozen=True)
class CuqLayout:
    """Shapes, bits and clip granularity of one direction's messages; ``layer_bits`` gives
    each quantized tensor its own width (empty: ``bits`` for all)."""

    split: SplitLayout
    bits: int
    granularity: str
    layer_bits: tuple[int, ...] = ()
    #: ``ans``: array 0 is one ``compression.entropy`` stream of every code (alphabet of the
    #: widest tensor's width) instead of packed bits.
    entropy: str = "none"

    def __post_init__(self) -> None:
        if self.layer_bits and len(self.layer_bits) != len(self.split.quantized_shapes):
            raise ValueError(
                f"{len(self.layer_bits)} layer widths for "
                f"{len(self.split.quantized_shapes)} quantized tensors"
            )

    @property
    def widths(self) -> tuple[int, ...]:
        """The width of every quantized tensor."""
        return self.layer_bits or (self.bits,) * len(self.split.quantized_shapes)

    @property
    def uniform(self) -> bool:
        return len(set(self.widths)) <= 1

    @property
    def codes_nbytes(self) -> int:
        if self.uniform:
            return packed_size(self.split.num_quantized, self.widths[0] if self.widths else 1)
        sizes = self.split.quantized_sizes
        return sum(packed_size(n, b) for n, b in zip(sizes, self.widths, strict=True))

    @property
    def widest(self) -> int:
        return max(self.widths, default=1)

    def pack(self, codes: np.ndarray) -> np.ndarray:
        """Array 0 of a message from the codes of every quantized scalar (wire order)."""
        if self.entropy == "ans":
            return entropy.encode(np.asarray(codes, dtype=np.uint8), self.widest)
        if self.uniform:
            return pack_codes(codes, self.widths[0] if self.widths else 1)
        pieces = np.split(np.asarray(codes), np.cumsum(self.split.quantized_sizes)[:-1])
        packed = [pack_codes(p, b) for p, b in zip(pieces, self.widths, strict=True)]
        return np.concatenate(packed) if packed else np.zeros(0, dtype=np.uint8)

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        """Inverse of ``pack``; checks the byte length exactly (packed bits), or the stream and
        every tensor's codes against its own width (``ans``)."""
        if self.entropy == "ans":
            codes = entropy.decode(packed, self.widest, self.split.num_quantized)
            if not self.uniform:
                pieces = np.split(codes, np.cumsum(self.split.quantized_sizes)[:-1])
                for index, (piece, bits) in enumerate(zip(pieces, self.widths, strict=True)):
                    if piece.size and int(piece.max()) >= 2**bits:
                        raise ValueError(f"tensor {index}: a code beyond its {bits}-bit width")
            return codes
        if self.uniform:
            width = self.widths[0] if self.widths else 1
            return unpack_codes(packed, width, self.split.num_quantized)
        packed = np.asarray(packed)
        if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != self.codes_nbytes:
            raise ValueError(f"codes must be {self.codes_nbytes} uint8 bytes, got {packed.size}")
        out, offset = [], 0
        for size, bits in zip(self.split.quantized_sizes, self.widths, strict=True):
            length = packed_size(size, bits)
            out.append(unpack_codes(packed[offset : offset + length], bits, size))
            offset += length
        return np.concatenate(out) if out else np.zeros(0, dtype=np.uint8)

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
            self.layout.pack(message.codes),
            side,
            np.asarray(message.extras).astype(self.extras_dtype, copy=False),
        ]

    def _decode(self, arrays: list[np.ndarray]) -> CuqMessage:
        packed, side, extras = arrays
        layout = self.layout
        codes = layout.unpack(packed)
        side = checked_floats(side, (self.side_size,), "clips/errors", ("float32",))
        clips = side[: layout.num_clips]
        if np.any(clips <= 0):
            raise ValueError("clips must be positive")
        if clips.size and float(clips.max()) > CLIP_LIMIT:
            raise ValueError(
                f"clip {float(clips.max()):.3g} is above {CLIP_LIMIT:.3g}: the grid's span "
                f"2 x clip would overflow float32"
            )
        errors = side[layout.num_clips :] if self.with_errors else None
        if errors is not None and np.any(errors < 0):
            raise ValueError("squared errors must be non-negative")
        extras = checked_floats(extras, (layout.split.num_extras,), "extras", (self.extras_dtype,))
        return CuqMessage(codes=codes, clips=clips, errors=errors, extras=extras)

    def payload_nbytes(self, message: CuqMessage | None = None) -> int:
        """Bytes of the arrays; with ``entropy=ans`` the codes' size is ``message``'s own."""
        if self.layout.entropy == "ans" and message is not None:
            return sum(a.nbytes for a in self.encode(message))
        return (
            self.layout.codes_nbytes
            + 4 * self.side_size
            + self.layout.split.num_extras * np.dtype(self.extras_dtype).itemsize
        )


def quantize_layers(
    tensors: Sequence[np.ndarray],
    layout: CuqLayout,
    rounding: str,
    generator: torch.Generator | None = None,
    clip_method: str = "mse",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """Quantize every quantized tensor at its width with its clip(s) (``clip_method``).

    Returns the concatenated codes (d,) uint8, clips (c,) float32, per-tensor SQE (L,) float64
    and the dequantized tensors (what the receiver will reconstruct, float32).
    """
    codes, clips, errors, restored = [], [], [], []
    for array, bits in zip(tensors, layout.widths, strict=True):
        clip, code, x_hat, error = quantize_tensor(
            torch.from_numpy(np.asarray(array, dtype=np.float32)),
            bits,
            rounding=rounding,
            granularity=layout.granularity,
            generator=generator,
            clip_method=clip_method,
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
            torch.from_numpy(code.reshape(shape)), torch.from_numpy(clip), bits
        ).numpy()
        for code, clip, shape, bits in zip(
            code_pieces, clip_pieces, shapes, layout.widths, strict=True
        )
    ]
