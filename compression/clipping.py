"""MSE-optimal clipping thresholds for B-bit clipped uniform quantization (arXiv 2405.13365).

Clipping |x| at s before quantizing to a B-bit grid on [-s, s] trades two errors. Values inside
the range get rounding noise of about ``coef * s^2`` each, values outside get the clipping error
(|x| - s)^2, so the modelled squared error of a tensor is

    J(s) = coef * s^2 * #{0 < |x| <= s} + sum_{|x| > s} (|x| - s)^2 .

Setting dJ/ds = 0 gives the fixed-point recursion of the paper (OCTAV-style):

    s <- sum_{|x| > s} |x| / ( coef * #{0 < |x| <= s} + #{|x| > s} ).

``coef`` depends on the grid and the rounding. The paper uses the nominal ``4^-B / 3``
(step 2s / 2^B, deterministic rounding: step^2 / 12 = s^2 4^-B / 3). Our grid puts 2^B levels
on [-s, s] including both ends (``compression.clipped_quant``), so the step is 2s / (2^B - 1);
nearest rounding then costs step^2 / 12 and stochastic rounding step^2 / 6 on average
(E[f (1 - f)] for a uniform fractional part f). ``noise_coefficient`` returns the exact value for
the grid used, so the clip minimises the error of the quantizer that actually runs.

The same recursion with expectations in place of sums gives the clip of a Gaussian or Laplace
population in units of its scale: the "closed-form" approximations ``k * sigma`` / ``k * b``
(ACIQ-style), kept for comparison and tests.
"""

from __future__ import annotations

import math

import torch

ROUNDINGS = ("stochastic", "deterministic")
GRANULARITIES = ("layer", "channel")
#: Clip used for a row whose entries are all zero: keeps the step positive and the error ~0.
TINY_CLIP = 1e-12


def noise_coefficient(bits: int, rounding: str = "deterministic", nominal: bool = False) -> float:
    """Per-value rounding noise of an in-range value, divided by s^2.

    ``nominal=True`` gives the paper's ``4^-B / 3`` whatever the rounding (for comparison with
    published ACIQ/OCTAV numbers); otherwise the exact value for our 2^B-level grid.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if nominal:
        return 4.0**-bits / 3.0
    step_over_s = 2.0 / (2**bits - 1)
    share = 1.0 / 6.0 if rounding == "stochastic" else 1.0 / 12.0
    return share * step_over_s**2


def clip_update(
    magnitude: torch.Tensor, clip: torch.Tensor, coef: float, positive: torch.Tensor | None = None
) -> torch.Tensor:
    """One step of the recursion for each row of ``magnitude`` (R, n) with clips ``clip`` (R,).

    ``positive`` (R,), the count of non-zero entries per row, may be passed in by a caller that
    iterates: it does not depend on the clip, and since clip > 0, #inside = #positive - #outside.
    """
    outside = magnitude > clip.unsqueeze(1)
    outside_count = outside.sum(1)
    if positive is None:
        positive = (magnitude > 0).sum(1)
    # Same summands as a masked copy of ``magnitude``, so the same float64 sum, without the copy.
    numerator = torch.where(outside, magnitude, magnitude.new_zeros(())).sum(1)
    denominator = coef * (positive - outside_count) + outside_count
    # A row with nothing above the clip would map to 0; keep its current clip instead (it only
    # happens for s >= max|x|, which the caller's clamp already excludes except for equality).
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), clip)


def fixed_point_clip(
    rows: torch.Tensor, coef: float, *, max_iter: int = 100, rtol: float = 1e-7
) -> tuple[torch.Tensor, int]:
    """MSE-optimal clip of every row of ``rows`` (R, n); returns (clips (R,) float64, steps).

    Starts at mean|x| (below the optimum of a bell-shaped row for B >= 2, where the map is
    increasing and contracts) and stops when no clip moves by more than ``rtol`` relative.
    On a finite sample the map is a step function of s (the counts jump at every |x_i|), so it
    can end in a 2-cycle between two clips a few 1e-6 apart: that is detected and the midpoint
    returned. Clips are kept in [TINY_CLIP, max|x|]: beyond max|x| J only grows, and an all-zero
    row gets TINY_CLIP so that the quantization step stays positive.
    """
    magnitude = rows.detach().abs().double()
    if magnitude.dim() != 2 or magnitude.shape[1] == 0:
        raise ValueError(f"rows must be a non-empty 2-D tensor, got shape {tuple(rows.shape)}")
    peak = magnitude.max(1).values
    upper = peak.clamp_min(TINY_CLIP)
    clip = magnitude.mean(1).clamp(TINY_CLIP, None).minimum(upper)
    positive = (magnitude > 0).sum(1)
    before = torch.full_like(clip, -1.0)
    for step in range(1, max_iter + 1):
        new = clip_update(magnitude, clip, coef, positive).clamp(TINY_CLIP, None).minimum(upper)
        settled = (new - clip).abs() <= rtol * clip
        cycling = new == before
        if bool((settled | cycling).all()):
            return torch.where(settled, new, 0.5 * (new + clip)), step
        before, clip = clip, new
    return clip, max_iter


def tensor_rows(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """(1, n) for one clip per layer, (C, n / C) for one clip per output channel (dim 0)."""
    if granularity == "layer" or x.dim() < 2:
        return x.reshape(1, -1)
    if granularity == "channel":
        return x.reshape(x.shape[0], -1)
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def optimal_clip(
    x: torch.Tensor, bits: int, rounding: str = "stochastic", granularity: str = "layer"
) -> torch.Tensor:
    """float32 clips of ``x``: shape (1,) per layer, (C,) per channel (1-D tensors: always (1,))."""
    coef = noise_coefficient(bits, rounding)
    clip, _ = fixed_point_clip(tensor_rows(x, granularity), coef)
    return clip.float()


def num_clips(shape: tuple[int, ...], granularity: str) -> int:
    """How many clip values a tensor of ``shape`` carries on the wire."""
    if granularity == "channel" and len(shape) >= 2:
        return int(shape[0])
    return 1


# --------------------------------------------------------------------- population approximations
def _normal_pdf(z: float) -> float:
    return math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _normal_tail(z: float) -> float:
    """P(Z > z) for a standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def gaussian_clip_factor(coef: float, *, max_iter: int = 500, rtol: float = 1e-12) -> float:
    """k such that s = k * sigma is the optimal clip of N(0, sigma^2) under noise ``coef``.

    Population recursion: E[|x|; |x| > s] = 2 sigma pdf(s/sigma), P(|x| > s) = 2 tail(s/sigma).
    """
    k = 1.0
    for _ in range(max_iter):
        tail = 2.0 * _normal_tail(k)
        new = 2.0 * _normal_pdf(k) / (coef * (1.0 - tail) + tail)
        if abs(new - k) <= rtol * k:
            return new
        k = new
    return k


def laplace_clip_factor(coef: float, *, max_iter: int = 500, rtol: float = 1e-12) -> float:
    """k such that s = k * b is the optimal clip of Laplace(0, b) under noise ``coef``.

    Population recursion: E[|x|; |x| > s] = (s + b) e^(-s/b), P(|x| > s) = e^(-s/b).
    """
    k = 1.0
    for _ in range(max_iter):
        tail = math.exp(-k)
        new = (k + 1.0) * tail / (coef * (1.0 - tail) + tail)
        if abs(new - k) <= rtol * k:
            return new
        k = new
    return k


def approximate_clip(
    x: torch.Tensor, bits: int, family: str, rounding: str = "stochastic"
) -> float:
    """Closed-form clip of ``x`` assuming a zero-mean ``gaussian`` or ``laplace`` distribution,
    its scale estimated from the sample (std, or mean absolute value for Laplace)."""
    coef = noise_coefficient(bits, rounding)
    values = x.detach().double().reshape(-1)
    if family == "gaussian":
        return gaussian_clip_factor(coef) * float(values.pow(2).mean().sqrt())
    if family == "laplace":
        return laplace_clip_factor(coef) * float(values.abs().mean())
    raise ValueError(f"family must be 'gaussian' or 'laplace', got {family!r}")
