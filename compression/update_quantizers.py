"""Unbiased stochastic quantizers of model updates: FedPAQ, DAdaQuant (max-norm, symmetric
levels), QSGD (L2-norm buckets, separate signs) and FedDQ (fixed step, variable width).

Every quantizer rounds stochastically (``compression.quantization.stochastic_round``), so the
decoded update equals the input in expectation. Inputs are flat float32 vectors (all wire tensors
of a model concatenated, d scalars); ``sizes`` splits them into the L tensors that get their own
scale. All codes are packed by ``compression.packing.pack_codes``.

Wire formats:

* symmetric (FedPAQ with b bits: q = 2^(b-1) - 1; DAdaQuant: q levels), two arrays:
    0. uint8 ``pack_codes(code + q, k)`` with code in [-q, q] and k = ``symmetric_bits(q)``
       = ceil(log2(2q + 1)) bits: ceil(d * k / 8) bytes;
    1. float32 (L,): per tensor its step max|x_l| / q (1.0 for an all-zero tensor);
       decoded x = code * step.
* QSGD (Alistarh et al. 2017) with s levels and buckets of B scalars, three arrays:
    0. uint8 ``pack_codes(sign bits, 1)``, ceil(d / 8) bytes (bit 1 = non-negative);
    1. uint8 ``pack_codes(m, k)``, m in [0, s], k = ceil(log2(s + 1)): ceil(d * k / 8) bytes;
    2. float32 (ceil(d / B),): the L2 norm of each bucket; decoded x = sign * norm * m / s.
* fixed step (FedDQ, Qu et al. 2022) with step delta, three arrays:
    0. uint8: the tensors' packed codes one after another, tensor l taking
       ``packed_size(d_l, k_l)`` bytes (0 when k_l = 0);
    1. float32 (L, 2): per tensor (min_l, step_l); decoded x = min_l + code * step_l;
    2. uint8 (L,): k_l, the smallest width with 2^k_l - 1 >= ceil((max_l - min_l) / delta),
       so widths fall as updates shrink; capped at 8 bits, where step_l grows to cover the range.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from compression.layout import checked_floats
from compression.packing import MAX_BITS, pack_codes, packed_size, unpack_codes
from compression.quantization import quantize, stochastic_round

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


def encode_symmetric(
    flat: np.ndarray, sizes: Sequence[int], levels: int, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(packed codes, per-tensor steps): stochastic rounding on the grid step * [-q, q]."""
    bits = symmetric_bits(levels)
    codes, steps = [], []
    for piece in _pieces(flat, sizes):
        peak = float(np.abs(piece).max()) if piece.size else 0.0
        # The step is rounded to float32 first: the decoder multiplies by exactly this value.
        step = np.float32(peak / levels) if peak > 0 else np.float32(1.0)
        q = quantize(torch.from_numpy(piece), float(step), -levels, levels, generator=generator)
        codes.append((q + levels).to(torch.uint8).numpy())
        steps.append(step)
    all_codes = np.concatenate(codes) if codes else np.zeros(0, dtype=np.uint8)
    return pack_codes(all_codes, bits), np.asarray(steps, dtype=np.float32)


def decode_symmetric(
    packed: np.ndarray, steps: np.ndarray, sizes: Sequence[int], levels: int
) -> np.ndarray:
    """float32 (d,) from ``encode_symmetric``'s arrays; ``ValueError`` says what is wrong."""
    bits = symmetric_bits(levels)
    codes = unpack_codes(packed, bits, int(sum(sizes))).astype(np.int32) - levels
    if codes.size and codes.max() > levels:
        raise ValueError(f"code above {levels} levels")
    steps = checked_floats(steps, (len(sizes),), "steps", ("float32",))
    if np.any(steps <= 0):
        raise ValueError("steps must be positive")
    return (codes * np.repeat(steps, sizes)).astype(np.float32)


# ------------------------------------------------------------------ QSGD
def qsgd_bits(levels: int) -> int:
    """Bits of a QSGD magnitude in [0, s]."""
    if not 1 <= levels <= 2**MAX_BITS - 1:
        raise ValueError(f"QSGD levels must be in 1..{2**MAX_BITS - 1}, got {levels}")
    return max(1, math.ceil(math.log2(levels + 1)))


def encode_qsgd(
    flat: np.ndarray, levels: int, bucket: int, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed signs, packed magnitudes, bucket norms); E[decode] = flat."""
    bits = qsgd_bits(levels)
    x = torch.from_numpy(np.asarray(flat, dtype=np.float32).reshape(-1))
    count = x.numel()
    buckets = -(-count // bucket)
    padded = torch.zeros(buckets * bucket, dtype=torch.float32)
    padded[:count] = x
    rows = padded.view(buckets, bucket)
    norms = rows.double().norm(dim=1).to(torch.float32)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    scaled = (rows.abs() / safe[:, None] * levels).clamp_(0, levels)
    magnitudes = stochastic_round(scaled, generator).clamp_(0, levels).reshape(-1)[:count]
    signs = (x >= 0).to(torch.uint8).numpy()
    return (
        pack_codes(signs, 1),
        pack_codes(magnitudes.to(torch.uint8).numpy(), bits),
        norms.numpy(),
    )


def decode_qsgd(
    signs: np.ndarray,
    magnitudes: np.ndarray,
    norms: np.ndarray,
    count: int,
    levels: int,
    bucket: int,
) -> np.ndarray:
    """float32 (count,) from ``encode_qsgd``'s arrays."""
    bits = qsgd_bits(levels)
    sign = unpack_codes(signs, 1, count).astype(np.float32) * 2.0 - 1.0
    mags = unpack_codes(magnitudes, bits, count).astype(np.float32)
    if mags.size and mags.max() > levels:
        raise ValueError(f"magnitude above {levels} levels")
    norms = checked_floats(norms, (-(-count // bucket),), "norms", ("float32",))
    if np.any(norms < 0):
        raise ValueError("norms must be non-negative")
    per_scalar = np.repeat(norms, bucket)[:count]
    return (sign * mags * (per_scalar / np.float32(levels))).astype(np.float32)


# ------------------------------------------------------------------ fixed step (FedDQ)
def fixed_step_width(value_range: float, step: float) -> int:
    """Smallest k with 2^k - 1 >= ceil(range / step): codes 0..K cover [min, max]; 0 if flat."""
    top = math.ceil(value_range / step) if value_range > 0 else 0
    return 0 if top == 0 else math.ceil(math.log2(top + 1))


def encode_fixed_step(
    flat: np.ndarray, sizes: Sequence[int], step: float, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed stream, (min, step) per tensor, widths per tensor) with a fixed step."""
    streams, params, widths = [], [], []
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
            codes = stochastic_round(y, generator).clamp_(0, 2**bits - 1).to(torch.uint8)
            streams.append(pack_codes(codes.numpy(), bits))
        params.append((low, used))
        widths.append(bits)
    stream = np.concatenate(streams) if streams else np.zeros(0, dtype=np.uint8)
    return (
        stream.astype(np.uint8, copy=False),
        np.asarray(params, dtype=np.float32).reshape(len(sizes), 2),
        np.asarray(widths, dtype=np.uint8),
    )


def decode_fixed_step(
    stream: np.ndarray, params: np.ndarray, widths: np.ndarray, sizes: Sequence[int]
) -> np.ndarray:
    """float32 (d,) from ``encode_fixed_step``'s arrays; checks every length exactly."""
    params = checked_floats(params, (len(sizes), 2), "params", ("float32",))
    widths = np.asarray(widths)
    if widths.dtype != np.uint8 or widths.shape != (len(sizes),):
        raise ValueError(f"widths must be uint8 ({len(sizes)},), got {widths.dtype} {widths.shape}")
    if np.any(widths > MAX_BITS):
        raise ValueError(f"widths must be at most {MAX_BITS}")
    stream = np.asarray(stream)
    if stream.dtype != np.uint8 or stream.ndim != 1:
        raise ValueError("stream must be 1-D uint8")
    lengths = [packed_size(n, int(k)) if k else 0 for n, k in zip(sizes, widths, strict=True)]
    if stream.size != sum(lengths):
        raise ValueError(f"stream must hold {sum(lengths)} bytes, got {stream.size}")
    out, offset = [], 0
    for size, bits, length, (low, used) in zip(sizes, widths, lengths, params, strict=True):
        if bits:
            codes = unpack_codes(stream[offset : offset + length], int(bits), size)
            out.append(low + codes.astype(np.float32) * used)
        else:
            out.append(np.full(size, low, dtype=np.float32))
        offset += length
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, dtype=np.float32)
