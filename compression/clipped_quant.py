"""Clipped uniform quantization to B-bit codes, its squared error, and inverse-error weights.

Grid: 2^B levels on [-s, s], both ends included, step ``delta = 2 s / (2^B - 1)``; code
u in [0, 2^B - 1] stands for ``-s + u * delta``. Using every code and hitting +-s exactly means a
value clipped to the edge costs only its clipping error. There is no level at 0 for even 2^B;
weights do not need one, and stochastic rounding keeps E[x_hat] = clamp(x, -s, s) regardless.

Rounding reuses ``compression.primitives.quantize`` (stochastic = dither of one step, then
floor, which is unbiased; or nearest). ``s`` is a scalar per tensor or one value per output
channel (dim 0), from ``compression.clipping``.

The server's inverse-SQE aggregation (paper, Sec. "weight averaging") weights client k's copy of
a layer by (1 / e_k) / sum_j (1 / e_j), e_k = that client's squared quantization error of the
layer: a client whose weights survived quantization better counts more.
"""

from __future__ import annotations

import numpy as np
import torch

from compression.clipping import optimal_clip
from compression.primitives import quantize


def levels(bits: int) -> int:
    """Number of grid levels, 2^B."""
    return 2**bits


def _per_row(clip: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a (1,) or (C,) clip against a tensor whose dim 0 has C entries."""
    clip = torch.as_tensor(clip, dtype=like.dtype, device=like.device).reshape(-1)
    if clip.numel() == 1:
        return clip.reshape(())
    if like.dim() == 0 or like.shape[0] != clip.numel():
        raise ValueError(f"{clip.numel()} clips do not match a tensor of shape {tuple(like.shape)}")
    return clip.view(-1, *([1] * (like.dim() - 1)))


def step_size(clip: torch.Tensor, bits: int) -> torch.Tensor:
    """Grid step 2 s / (2^B - 1) for each clip."""
    return 2.0 * clip / (levels(bits) - 1)


def clipped_quantize(
    x: torch.Tensor,
    clip: torch.Tensor,
    bits: int,
    *,
    stochastic: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 codes in [0, 2^B - 1] of ``x`` clipped to [-s, s] (``s`` per tensor or per row)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8 for uint8 codes, got {bits}")
    s = _per_row(clip, x)
    if bool((s <= 0).any()):
        raise ValueError("clips must be positive")
    shifted = torch.clamp(x, -s, s) + s
    codes = quantize(
        shifted, step_size(s, bits), 0, levels(bits) - 1, stochastic=stochastic, generator=generator
    )
    return codes.to(torch.uint8)


def clipped_dequantize(codes: torch.Tensor, clip: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 values -s + u * delta of the codes (shape kept)."""
    s = _per_row(clip, codes.to(torch.float32))
    return codes.to(torch.float32) * step_size(s, bits) - s


def squared_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """SQE: sum of (x - x_hat)^2 over the tensor, accumulated in float64."""
    return float((x.detach().double() - x_hat.detach().double()).pow(2).sum())


def quantize_tensor(
    x: torch.Tensor,
    bits: int,
    *,
    rounding: str,
    granularity: str,
    generator: torch.Generator | None = None,
    clip_method: str = "mse",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Clip (``compression.clipping``, by ``clip_method``), codes, dequantized tensor and SQE of
    one weight tensor, in one call."""
    clip = optimal_clip(x, bits, rounding, granularity, clip_method)
    codes = clipped_quantize(
        x, clip, bits, stochastic=rounding == "stochastic", generator=generator
    )
    x_hat = clipped_dequantize(codes, clip, bits)
    return clip, codes, x_hat, squared_error(x, x_hat)


def inverse_error_weights(errors: np.ndarray, floor: float = 1e-30) -> np.ndarray:
    """Weights (1 / e_k) / sum_j (1 / e_j) along axis 0 (clients); any further axes (layers)
    are normalised independently. Errors are floored at ``floor`` so that an exact (zero-error)
    client gets a finite, dominant weight instead of a division by zero."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim == 0 or errors.shape[0] == 0:
        raise ValueError("need the errors of at least one client")
    if not np.all(np.isfinite(errors)) or np.any(errors < 0):
        raise ValueError("errors must be finite and non-negative")
    inverse = 1.0 / np.maximum(errors, floor)
    return inverse / inverse.sum(axis=0, keepdims=True)


class ClippedQuantSTE(torch.autograd.Function):
    """Forward: clipped uniform quantization with the chosen clip of the current weights.
    Backward: straight-through (identity), so quantization-aware training updates float
    shadow weights that the quantizer reads again at every step."""

    @staticmethod
    def forward(
        ctx,
        weight: torch.Tensor,
        bits: int,
        rounding: str,
        granularity: str,
        generator: torch.Generator | None,
        clip_method: str,
    ) -> torch.Tensor:
        _, _, x_hat, _ = quantize_tensor(
            weight.detach(),
            bits,
            rounding=rounding,
            granularity=granularity,
            generator=generator,
            clip_method=clip_method,
        )
        return x_hat.to(weight.dtype)

    @staticmethod
    def backward(
        ctx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None, None, None]:
        return grad_output, None, None, None, None, None


def fake_quantize(
    weight: torch.Tensor,
    bits: int,
    rounding: str,
    granularity: str,
    generator: torch.Generator | None = None,
    clip_method: str = "mse",
) -> torch.Tensor:
    """Quantized weights with a straight-through gradient (for quantization-aware training)."""
    return ClippedQuantSTE.apply(weight, bits, rounding, granularity, generator, clip_method)
