"""Quantization primitives every codec and low-bit layer builds on: grids, scales, rounding.

Two families of integer grid appear in the methods:

* the *offset* (two's-complement-sized) grid of FedBiF Eq. 1, [-2^(m-1), 2^(m-1) - 1]
  (``signed_range``), with the step of Eq. 5 mapping max|x| to 2^(m-1) (``max_abs_step``);
* the *symmetric* grid of LBI-FL Eq. 2, [-(2^(k-1) - 1), 2^(k-1) - 1], or the unsigned
  [0, 2^k - 1] behind a ReLU (``grid``), with max-abs scales per tensor or per output channel.

Quantization is ``round(clamp(x / step, low, high))`` (Eq. 1) and dequantization
``step * codes`` (Eq. 3), where ``round`` is either stochastic (Eq. 2: up with probability equal
to the fractional part, so E[codes] = clamp(x / step) exactly) or to the nearest integer.
``fake_quantize`` adds the straight-through gradient of quantization-aware training, and
``quantize_stochastic`` is the unbiased max-abs quantizer of gradients. Pure torch; any device.
"""

from __future__ import annotations

import torch


# --------------------------------------------------------------------------- rounding
def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """floor(x + U), U ~ Uniform[0, 1): unbiased, E = x (Eq. 2)."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.floor(x + noise)


def quantize(
    x: torch.Tensor,
    step: float | torch.Tensor,
    low: int,
    high: int,
    *,
    stochastic: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Integer codes (int32) of ``x`` on the grid ``step * [low, high]``."""
    scaled = torch.clamp(x / step, low, high)
    rounded = stochastic_round(scaled, generator) if stochastic else torch.round(scaled)
    # Clamping again guards the float rounding of x/step at the boundaries.
    return torch.clamp(rounded, low, high).to(torch.int32)


def dequantize(codes: torch.Tensor, step: float | torch.Tensor) -> torch.Tensor:
    """Eq. 3: float values of integer codes."""
    return codes.to(torch.float32) * step


# --------------------------------------------------------------------------- grids and scales
def signed_range(bits: int) -> tuple[int, int]:
    """The two's-complement-sized range of Eq. 1: [-2^(m-1), 2^(m-1) - 1]."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def grid(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a symmetric signed (Eq. 2: +-(2^(k-1) - 1)) or unsigned k-bit grid."""
    if signed:
        top = 2 ** (bits - 1) - 1
        return -top, top
    return 0, 2**bits - 1


def max_abs_step(x: torch.Tensor, levels: int) -> float:
    """Step size that maps max|x| to ``levels`` (Eq. 5 uses levels = 2^(m-1)).

    An all-zero tensor gets step 1.0 so that its codes are 0 and nothing divides by zero.
    """
    peak = float(x.abs().max()) if x.numel() else 0.0
    return peak / levels if peak > 0 else 1.0


def max_abs_scale(x: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Scale mapping max|x| onto the top code; 1.0 for an all-zero tensor (codes all 0)."""
    peak = x.detach().abs().amax() if x.numel() else x.new_zeros(())
    scale = peak.float() / grid(bits, signed)[1]
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def channel_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel max-abs scales of a weight, shaped to broadcast against it
    ((C, 1, 1, 1) for a conv, (C, 1) for a linear layer); 1.0 for an all-zero channel.

    One scale per channel, as INT4 weight quantizers use: a per-tensor scale lets the channel
    with the largest weights set the step of all others, which at 4 bits leaves most weights on
    the two or three central levels.
    """
    dims = tuple(range(1, weight.dim()))
    peak = weight.detach().abs().amax(dim=dims, keepdim=True) if dims else weight.detach().abs()
    scale = peak.float() / grid(bits, True)[1]
    return torch.where(scale > 0, scale, torch.ones_like(scale))


# --------------------------------------------------------------------------- symmetric grid ops
def quantize_nearest(x: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Integer codes (as floats) of ``x``: clamp(round(x / s)) on the k-bit grid."""
    low, high = grid(bits, signed)
    return torch.clamp(torch.round(x / scale), low, high)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """``s * Q_n(x)`` with a clipped straight-through gradient, so shadow weights train.

    The gradient is 1 where rounding decides the code and 0 where the clamp does (|x / s| past
    the grid's end by more than half a step), as PyTorch's ``FakeQuantize``: with an identity
    gradient, a value clipped by a stale scale is pushed further out by every step whose loss
    wants it larger, its output never moves, and the weights behind it grow until the loss
    overflows (measured: one LBI-FL client on digits, INT4, stale activation scales, training
    loss 2.0 -> 8e4 in the second round).
    """
    low, high = grid(bits, signed)
    codes = x.detach() / scale
    quantized = (torch.clamp(torch.round(codes), low, high) * scale).to(x.dtype)
    inside = (codes >= low - 0.5) & (codes <= high + 0.5)
    return quantized + (x - x.detach()) * inside.to(x.dtype)


def quantize_stochastic(
    g: torch.Tensor, bits: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Eq. 3 on a symmetric k-bit grid with scale max|g| / (2^(k-1) - 1): unbiased, in range.

    g / s lies in [-top, top], and floor(v + U) with U ~ U[0, 1) never leaves that range, so no
    clamping biases the result: E[result] = g exactly.
    """
    scale = max_abs_scale(g, bits, signed=True)
    noise = torch.rand(g.shape, generator=generator, device=g.device, dtype=g.dtype)
    return torch.floor(g / scale + noise) * scale
