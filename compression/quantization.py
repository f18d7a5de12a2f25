"""Uniform quantization to signed integer codes with stochastic or nearest rounding.

FedBiF Eqs. 1-3 (and the quantizers of the baselines):

    codes = round(clamp(x / step, low, high))      (Eq. 1; Eq. 1 itself uses low = -2^(m-1),
    x_hat = step * codes                            (Eq. 3)           high = 2^(m-1) - 1)

with ``round`` either stochastic (Eq. 2: up with probability equal to the fractional part, so
E[codes] = clamp(x / step) exactly) or to the nearest integer. Pure torch; works on any device.
"""

from __future__ import annotations

import torch


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


def signed_range(bits: int) -> tuple[int, int]:
    """The two's-complement-sized range of Eq. 1: [-2^(m-1), 2^(m-1) - 1]."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def dequantize(codes: torch.Tensor, step: float | torch.Tensor) -> torch.Tensor:
    """Eq. 3: float values of integer codes."""
    return codes.to(torch.float32) * step


def max_abs_step(x: torch.Tensor, levels: int) -> float:
    """Step size that maps max|x| to ``levels`` (Eq. 5 uses levels = 2^(m-1)).

    An all-zero tensor gets step 1.0 so that its codes are 0 and nothing divides by zero.
    """
    peak = float(x.abs().max()) if x.numel() else 0.0
    return peak / levels if peak > 0 else 1.0
