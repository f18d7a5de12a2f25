"""FedBAT's learnable stochastic binarization operator (pure torch, any device).

Forward, for an update tensor x and a step size a > 0 (a 0-dim tensor), with U ~ Uniform[0, 1):

    s = x / a,   b = clamp(floor((s + 1) / 2 + U), 0, 1),   y = a * (2 b - 1)

so y is +a or -a, and P(b = 1) = clamp((s + 1) / 2, 0, 1): E[y] = x exactly when |x| <= a
(stochastic rounding of s onto {-1, +1}), and y = a * sign(x) deterministically outside.

Backward (the "designed derivatives" of the paper; the true derivative of the sampled y is zero
almost everywhere, which would stop learning):

    dL/dx = dL/dy * [|s| <= 1]                                  (clipped straight-through)
    dL/da = sum( dL/dy * ( [s > 1] - [s < -1] + [|s| <= 1] * (2 b - 1 - s) ) )

Outside [-a, a] the step-size term is d(a * sign(x))/da; inside it is the realised residual of
the binary value against s, whose mean over U is zero, matching dE[y]/da = 0 there.

The step size itself is parametrised as ``a = clamp(a0 * exp(rho * a_e), a_min, a_max)`` with a
learnable a_e (``learnable_step``) so that a stays positive and moves multiplicatively.
"""

from __future__ import annotations

import torch


class StochasticBinarize(torch.autograd.Function):
    """y = a * (2 b - 1) with unbiased stochastic b; designed backward (module docstring).

    ``noise`` holds the U draws (same shape as x) so that a caller can keep the bits it trained
    with, and tests can fix the randomness.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        scaled = x / alpha
        bits = binary_codes_from_scaled(scaled, noise)
        ctx.save_for_backward(scaled, bits)
        ctx.alpha_shape = alpha.shape
        return alpha * (2.0 * bits - 1.0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        scaled, bits = ctx.saved_tensors
        inside = (scaled.abs() <= 1.0).to(grad_output.dtype)
        grad_x = grad_output * inside
        local = (
            (scaled > 1.0).to(grad_output.dtype)
            - (scaled < -1.0).to(grad_output.dtype)
            + inside * (2.0 * bits - 1.0 - scaled)
        )
        grad_alpha = (grad_output * local).sum().reshape(ctx.alpha_shape)
        return grad_x, grad_alpha, None


def binary_codes_from_scaled(scaled: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """b = clamp(floor((s + 1) / 2 + U), 0, 1) as float 0/1 (same dtype as ``scaled``)."""
    return torch.clamp(torch.floor((scaled + 1.0) / 2.0 + noise), 0.0, 1.0)


def uniform_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """U ~ Uniform[0, 1) of ``like``'s shape, drawn on the CPU generator then moved (so a seeded
    CPU generator gives the same bits on every device)."""
    noise = torch.rand(like.shape, generator=generator, dtype=like.dtype)
    return noise.to(like.device)


def stochastic_binarize(
    x: torch.Tensor,
    alpha: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Differentiable binarized ``x`` (values +-alpha); draws ``noise`` if not given."""
    if noise is None:
        noise = uniform_noise(x, generator)
    return StochasticBinarize.apply(x, alpha, noise)


def learnable_step(
    alpha0: torch.Tensor | float,
    alpha_e: torch.Tensor,
    rho: float,
    alpha_min: float,
    alpha_max: float,
) -> torch.Tensor:
    """a = clamp(a0 * exp(rho * a_e), a_min, a_max): positive, and differentiable in a_e
    (da/da_e = rho * a inside the clamp range, 0 where the clamp is active)."""
    return torch.clamp(alpha0 * torch.exp(rho * alpha_e), alpha_min, alpha_max)


@torch.no_grad()
def binarize_to_codes(
    x: torch.Tensor, alpha: torch.Tensor | float, noise: torch.Tensor
) -> torch.Tensor:
    """The bits b (uint8 0/1) the forward pass would use: what goes on the wire."""
    return binary_codes_from_scaled(x / alpha, noise).to(torch.uint8)


def codes_to_values(codes: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """a * (2 b - 1) in float32: the binarized update a pair (bits, alpha) stands for."""
    alpha_t = torch.as_tensor(alpha, dtype=torch.float32, device=codes.device)
    return torch.where(codes.to(torch.bool), alpha_t, -alpha_t)
