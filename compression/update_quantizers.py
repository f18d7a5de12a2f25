"""Unbiased stochastic quantizers of model updates and their wire formats: FedPAQ, DAdaQuant
(max-norm, symmetric levels), QSGD (L2-norm buckets, separate signs) and FedDQ (fixed step,
variable width).

Every quantizer rounds stochastically (``compression.primitives.stochastic_round``), so the
decoded update equals the input in expectation. Inputs are flat float32 vectors (all wire tensors
of a model concatenated, d scalars); ``sizes`` splits them into the L tensors that get their own
scale. A quantizer returns a message; its codec packs the codes with
``compression.packing.pack_codes``; a ``dequantize_*`` function gives the float32 update back.

Wire formats:

* ``SymmetricCodec`` (FedPAQ with b bits: q = 2^(b-1) - 1; DAdaQuant: q levels), two arrays:
    0. uint8 ``pack_codes(code + q, k)`` with code in [-q, q] and k = ``symmetric_bits(q)``
       = ceil(log2(2q + 1)) bits: ceil(d * k / 8) bytes;
    1. float32 (L,): per tensor its step max|x_l| / q (1.0 for an all-zero tensor);
       decoded x = code * step.
* ``QSGDCodec`` (Alistarh et al. 2017) with s levels and buckets of B scalars, three arrays:
    0. uint8 ``pack_codes(sign bits, 1)``, ceil(d / 8) bytes (bit 1 = non-negative);
    1. uint8 ``pack_codes(m, k)``, m in [0, s], k = ceil(log2(s + 1)): ceil(d * k / 8) bytes;
    2. float32 (ceil(d / B),): the L2 norm of each bucket; decoded x = sign * norm * m / s.
* ``FixedStepCodec`` (FedDQ, Qu et al. 2022) with step delta, three arrays:
    0. uint8: the tensors' packed codes one after another, tensor l taking
       ``packed_size(d_l, k_l)`` bytes (0 when k_l = 0);
    1. float32 (L, 2): per tensor (min_l, step_l); decoded x = min_l + code * step_l;
    2. uint8 (L,): k_l, the smallest width with 2^k_l - 1 >= ceil((max_l - min_l) / delta),
       so widths fall as updates shrink; capped at 8 bits, where step_l grows to cover the range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from compression import entropy
from compression.codec import Codec
from compression.layout import checked_floats
from compression.packing import MAX_BITS, pack_codes, packed_size, unpack_codes
from compression.primitives import quantize, stochastic_round

MAX_SYMMETRIC_LEVELS = (2**MAX_BITS - 1) // 2  # 127: 255 codes fit in 8 bits


def _pieces(flat: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    flat = np.asarray(flat, dtype=np.float32).reshape(-1)
    if flat.size != sum(sizes):
        raise ValueError(f"expected {sum(sizes)} scalars, got {flat.size}")
    return np.split(flat, np.cumsum(sizes)[:-1]) if len(sizes) else []


# ------------------------------------------------------------------ symmetric (FedPAQ, DAdaQuant)
def symmetric_bits(levels: int) -> int:
    """Bits of a code in [-levels, levels]: ceil(log2(2 * levels + 1))."""
    if not 1 <= levels <= MAX_SYMMETRIC_LEVELS:
        raise ValueError(f"levels must be in 1..{MAX_SYMMETRIC_LEVELS}, got {levels}")
    return math.ceil(math.log2(2 * levels + 1))


@dataclass(frozen=True)
class SymmetricMessage:
    """Codes (d,) int16 in [-q, q] and per-tensor steps (L,) float32."""

    codes: np.ndarray
    steps: np.ndarray


def quantize_symmetric(
    flat: np.ndarray, sizes: Sequence[int], levels: int, generator: torch.Generator
) -> SymmetricMessage:
    """Stochastic rounding on the grid step * [-q, q], one max-abs step per tensor."""
    symmetric_bits(levels)
    codes, steps = [], []
    for piece in _pieces(flat, sizes):
        peak = float(np.abs(piece).max()) if piece.size else 0.0
        # The step is rounded to float32 first: the decoder multiplies by exactly this value.
        step = np.float32(peak / levels) if peak > 0 else np.float32(1.0)
        q = quantize(torch.from_numpy(piece), float(step), -levels, levels, generator=generator)
        codes.append(q.to(torch.int16).numpy())
        steps.append(step)
    all_codes = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int16)
    return SymmetricMessage(all_codes, np.asarray(steps, dtype=np.float32))


def dequantize_symmetric(message: SymmetricMessage, sizes: Sequence[int]) -> np.ndarray:
    """float32 (d,): code * step of its tensor."""
    return (message.codes * np.repeat(message.steps, sizes)).astype(np.float32)


@dataclass(frozen=True)
class SymmetricCodec(Codec[SymmetricMessage]):
    """Codes in [-q, q] at ``symmetric_bits(q)`` bits plus one step per tensor."""

    sizes: tuple[int, ...]
    levels: int
    #: ``ans``: the codes travel as a ``compression.entropy`` stream instead of packed bits.
    entropy: str = "none"
    name = "a symmetric-levels update"
    num_arrays = 2

    @property
    def bits(self) -> int:
        return symmetric_bits(self.levels)

    def encode(self, message: SymmetricMessage) -> list[np.ndarray]:
        unsigned = (message.codes.astype(np.int16) + self.levels).astype(np.uint8)
        return [
            entropy.pack(unsigned, self.bits, self.entropy),
            np.asarray(message.steps, dtype=np.float32),
        ]

    def _decode(self, arrays: list[np.ndarray]) -> SymmetricMessage:
        packed, steps = arrays
        codes = entropy.unpack(packed, self.bits, int(sum(self.sizes)), self.entropy)
        codes = codes.astype(np.int16)
        codes -= self.levels
        if codes.size and codes.max() > self.levels:
            raise ValueError(f"code above {self.levels} levels")
        steps = checked_floats(steps, (len(self.sizes),), "steps", ("float32",))
        if np.any(steps <= 0):
            raise ValueError("steps must be positive")
        return SymmetricMessage(codes, steps)

    def payload_nbytes(self, message: SymmetricMessage | None = None) -> int:
        """Bytes of the arrays; with ``entropy=ans`` the codes' size is ``message``'s own."""
        if self.entropy == "ans" and message is not None:
            return sum(a.nbytes for a in self.encode(message))
        return packed_size(int(sum(self.sizes)), self.bits) + 4 * len(self.sizes)


# ------------------------------------------------------------------ QSGD
def qsgd_bits(levels: int) -> int:
    """Bits of a QSGD magnitude in [0, s]."""
    if not 1 <= levels <= 2**MAX_BITS - 1:
        raise ValueError(f"QSGD levels must be in 1..{2**MAX_BITS - 1}, got {levels}")
    return max(1, math.ceil(math.log2(levels + 1)))


@dataclass(frozen=True)
class QSGDMessage:
    """Sign bits (d,) uint8 (1 = non-negative), magnitudes (d,) uint8 in [0, s], norms (B,)."""

    signs: np.ndarray
    magnitudes: np.ndarray
    norms: np.ndarray


def effective_bucket(bucket: int, count: int) -> int:
    """The bucket QSGD uses for ``count`` values: one past the vector's end is the whole vector."""
    return min(bucket, max(count, 1))


def quantize_qsgd(
    flat: np.ndarray, levels: int, bucket: int, generator: torch.Generator
) -> QSGDMessage:
    """s-level magnitudes of |x| / ||bucket||_2, stochastically rounded; E[decode] = flat."""
    qsgd_bits(levels)
    x = torch.from_numpy(np.asarray(flat, dtype=np.float32).reshape(-1))
    count = x.numel()
    bucket = effective_bucket(bucket, count)
    buckets = -(-count // bucket)
    padded = torch.zeros(buckets * bucket, dtype=torch.float32)
    padded[:count] = x
    rows = padded.view(buckets, bucket)
    norms = rows.double().norm(dim=1).to(torch.float32)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    scaled = (rows.abs() / safe[:, None] * levels).clamp_(0, levels)
    magnitudes = stochastic_round(scaled, generator).clamp_(0, levels).reshape(-1)[:count]
    return QSGDMessage(
        (x >= 0).to(torch.uint8).numpy(), magnitudes.to(torch.uint8).numpy(), norms.numpy()
    )


def dequantize_qsgd(message: QSGDMessage, levels: int, bucket: int) -> np.ndarray:
    """float32 (d,): sign * norm of the bucket * m / s."""
    count = message.signs.size
    sign = message.signs.astype(np.float32) * 2.0 - 1.0
    mags = message.magnitudes.astype(np.float32)
    per_scalar = np.repeat(message.norms, effective_bucket(bucket, count))[:count]
    return (sign * mags * (per_scalar / np.float32(levels))).astype(np.float32)


@dataclass(frozen=True)
class QSGDCodec(Codec[QSGDMessage]):
    """QSGD with ``levels`` s and buckets of ``bucket`` scalars over ``count`` scalars."""

    count: int
    levels: int
    bucket: int
    entropy: str = "none"
    name = "a QSGD update"
    num_arrays = 3

    @property
    def num_buckets(self) -> int:
        return -(-self.count // self.bucket)

    def encode(self, message: QSGDMessage) -> list[np.ndarray]:
        return [
            entropy.pack(message.signs, 1, self.entropy),
            entropy.pack(message.magnitudes, qsgd_bits(self.levels), self.entropy),
            np.asarray(message.norms, dtype=np.float32),
        ]

    def _decode(self, arrays: list[np.ndarray]) -> QSGDMessage:
        signs, magnitudes, norms = arrays
        sign_bits = entropy.unpack(signs, 1, self.count, self.entropy)
        mags = entropy.unpack(magnitudes, qsgd_bits(self.levels), self.count, self.entropy)
        if mags.size and mags.max() > self.levels:
            raise ValueError(f"magnitude above {self.levels} levels")
        norms = checked_floats(norms, (self.num_buckets,), "norms", ("float32",))
        if np.any(norms < 0):
            raise ValueError("norms must be non-negative")
        return QSGDMessage(sign_bits, mags, norms)

    def payload_nbytes(self, message: QSGDMessage | None = None) -> int:
        """Bytes of the arrays; with ``entropy=ans`` the codes' size is ``message``'s own."""
        if self.entropy == "ans" and message is not None:
            return sum(a.nbytes for a in self.encode(message))
        return (
            packed_size(self.count, 1)
            + packed_size(self.count, qsgd_bits(self.levels))
            + 4 * self.num_buckets
        )


# ------------------------------------------------------------------ fixed step (FedDQ)
def fixed_step_width(value_range: float, step: float) -> int:
    """Smallest k with 2^k - 1 >= ceil(range / step): codes 0..K cover [min, max]; 0 if flat."""
    top = math.ceil(value_range / step) if value_range > 0 else 0
    return 0 if top == 0 else math.ceil(math.log2(top + 1))


@dataclass(frozen=True)
class FixedStepMessage:
    """Codes (d,) uint8 (tensor l's below 2^k_l), (min, step) per tensor (L, 2), widths (L,)."""

    codes: np.ndarray
    params: np.ndarray
    widths: np.ndarray


def quantize_fixed_step(
    flat: np.ndarray, sizes: Sequence[int], step: float, generator: torch.Generator
) -> FixedStepMessage:
    """Codes on min_l + step * [0, 2^k_l - 1] per tensor, k_l just wide enough for its range."""
    codes, params, widths = [], [], []
    for piece in _pieces(flat, sizes):
        low = np.float32(piece.min()) if piece.size else np.float32(0.0)
        value_range = float(piece.max()) - float(low) if piece.size else 0.0
        bits = fixed_step_width(value_range, step)
        used = np.float32(step)
        if bits > MAX_BITS:  # too wide to pack: enlarge the step so 255 codes span the range
            bits = MAX_BITS
            used = np.float32(value_range / (2**MAX_BITS - 1)) * np.float32(1 + 1e-6)
        if bits:
            y = torch.from_numpy((piece - low) / used)
            code = stochastic_round(y, generator).clamp_(0, 2**bits - 1).to(torch.uint8)
            codes.append(code.numpy())
        else:
            codes.append(np.zeros(piece.size, dtype=np.uint8))
        params.append((low, used))
        widths.append(bits)
    return FixedStepMessage(
        np.concatenate(codes) if codes else np.zeros(0, dtype=np.uint8),
        np.asarray(params, dtype=np.float32).reshape(len(sizes), 2),
        np.asarray(widths, dtype=np.uint8),
    )


def dequantize_fixed_step(message: FixedStepMessage, sizes: Sequence[int]) -> np.ndarray:
    """float32 (d,): min_l + code * step_l (min_l for a width-0 tensor)."""
    out = []
    pieces = np.split(message.codes, np.cumsum(sizes)[:-1]) if len(sizes) else []
    for piece, bits, (low, used) in zip(pieces, message.widths, message.params, strict=True):
        if bits:
            out.append(low + piece.astype(np.float32) * used)
        else:
            out.append(np.full(piece.size, low, dtype=np.float32))
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, dtype=np.float32)


@dataclass(frozen=True)
class FixedStepCodec(Codec[FixedStepMessage]):
    """FedDQ's variable-width stream over tensors of ``sizes``."""

    sizes: tuple[int, ...]
    name = "a fixed-step update"
    num_arrays = 3

    def _lengths(self, widths: np.ndarray) -> list[int]:
        return [packed_size(n, int(k)) if k else 0 for n, k in zip(self.sizes, widths, strict=True)]

    def encode(self, message: FixedStepMessage) -> list[np.ndarray]:
        streams = []
        pieces = np.split(message.codes, np.cumsum(self.sizes)[:-1]) if self.sizes else []
        for piece, bits in zip(pieces, message.widths, strict=True):
            if bits:
                streams.append(pack_codes(piece, int(bits)))
        stream = np.concatenate(streams) if streams else np.zeros(0, dtype=np.uint8)
        return [
            stream.astype(np.uint8, copy=False),
            np.asarray(message.params, dtype=np.float32).reshape(len(self.sizes), 2),
            np.asarray(message.widths, dtype=np.uint8),
        ]

    def _decode(self, arrays: list[np.ndarray]) -> FixedStepMessage:
        stream, params, widths = arrays
        layers = len(self.sizes)
        params = checked_floats(params, (layers, 2), "params", ("float32",))
        widths = np.asarray(widths)
        if widths.dtype != np.uint8 or widths.shape != (layers,):
            raise ValueError(f"widths must be uint8 ({layers},), got {widths.dtype} {widths.shape}")
        if np.any(widths > MAX_BITS):
            raise ValueError(f"widths must be at most {MAX_BITS}")
        stream = np.asarray(stream)
        if stream.dtype != np.uint8 or stream.ndim != 1:
            raise ValueError("stream must be 1-D uint8")
        lengths = self._lengths(widths)
        if stream.size != sum(lengths):
            raise ValueError(f"stream must hold {sum(lengths)} bytes, got {stream.size}")
        codes, offset = [], 0
        for size, bits, length in zip(self.sizes, widths, lengths, strict=True):
            if bits:
                codes.append(unpack_codes(stream[offset : offset + length], int(bits), size))
            else:
                codes.append(np.zeros(size, dtype=np.uint8))
            offset += length
        all_codes = np.concatenate(codes) if codes else np.zeros(0, dtype=np.uint8)
        return FixedStepMessage(all_codes, params, widths)

    def payload_nbytes(self, message: FixedStepMessage) -> int:
        return sum(self._lengths(message.widths)) + 8 * len(self.sizes) + len(self.sizes)
