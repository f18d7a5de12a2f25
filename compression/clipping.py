"""Clipping thresholds for B-bit clipped uniform quantization (arXiv 2405.13365).

Clipping |x| at s before quantizing to a B-bit grid on [-s, s] trades two errors: values
outside get the clipping error (|x| - s)^2, values inside the rounding error of the grid. Three
ways to choose s, by ``CLIP_METHODS`` (the run-config key ``cuq-clip``):

* ``mse`` (default): the s that minimises the *exact* squared error of the quantizer that runs
  (``mse_clip``). Our grid puts 2^B levels on [-s, s], both ends included, step
  Delta = 2 s / (2^B - 1); a value at fractional grid position f costs Delta^2 f (1 - f) in
  expectation under stochastic rounding and Delta^2 min(f, 1 - f)^2 under nearest rounding, so

      J(s) = sum_{|x| > s} (|x| - s)^2 + Delta(s)^2 sum_{|x| <= s} g(frac((|x| + s) / Delta(s))).

  (Symmetry: -x sits at 1 - f, which g treats alike, so J depends on |x| only.) J has no closed
  form minimiser; it is evaluated on candidates around the model optimum below, then refined
  by golden-section search in the cells of the best few candidates (J can have near-equal
  minima apart). Long rows are summarised first in a histogram of |x| (``search_size``; per
  bin: count, sum, sum of squares, so the clipping term stays exact and only the rounding term
  uses the bin's mean position, a bin being a small fraction of a grid step at every width);
  the model optimum, where the search starts, is taken on the same summary.
* ``model``: the fixed point of the error *model* that treats f as uniform (noise
  ``coef * s^2`` per in-range value, ``noise_coefficient``), the OCTAV-style recursion

      s <- sum_{|x| > s} |x| / ( coef * #{0 < |x| <= s} + #{|x| > s} )

  solved to convergence in float64 (``fixed_point_clip``). It is the start of the ``mse``
  search. Measured against the exact J it is 4.5-7.4% off at 2 bits.
* ``octav``: the authors' code: the same recursion with the paper's nominal coefficient
  4^-B / 3 and exactly 10 float32 iterations from mean|x| (``octav_clip``).

The same recursion with expectations in place of sums gives the clip of a Gaussian or Laplace
population in units of its scale: the "closed-form" approximations ``k * sigma`` / ``k * b``
(ACIQ-style), kept for comparison and tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROUNDINGS = ("stochastic", "deterministic")
GRANULARITIES = ("layer", "channel")
CLIP_METHODS = ("mse", "model", "octav")
#: golden-section steps of the refinement after the coarse search.
_GOLDEN_STEPS = 20
#: largest (rows x candidates x values) block evaluated at once, to bound memory.
_BLOCK = 1 << 23
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


def octav_clip(rows: torch.Tensor, bits: int, iterations: int = 10) -> torch.Tensor:
    """The authors' clip per row of ``rows`` (R, n): ``iterations`` float32 steps of the
    recursion with coefficient 4^-B / 3, from s = mean|x|; a row whose denominator reaches 0
    keeps its clip (their code stops there)."""
    magnitude = rows.detach().abs().float()
    coef = torch.tensor(4.0**-bits / 3.0, dtype=torch.float32)
    clip = magnitude.mean(1)
    for _ in range(iterations):
        outside = magnitude > clip.unsqueeze(1)
        inside = (magnitude <= clip.unsqueeze(1)) & (magnitude > 0)
        numerator = torch.where(outside, magnitude, magnitude.new_zeros(())).sum(1)
        denominator = coef * inside.sum(1).float() + outside.sum(1).float()
        clip = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-30), clip)
    return clip


def rounding_error(position: torch.Tensor, rounding: str) -> torch.Tensor:
    """g(f): squared error of a value at fractional grid position f, in units of Delta^2
    (expected under stochastic rounding, realised under nearest)."""
    frac = position - torch.floor(position)
    if rounding == "stochastic":
        return frac * (1.0 - frac)
    if rounding == "deterministic":
        return torch.minimum(frac, 1.0 - frac).square()
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


@dataclass(frozen=True)
class MagnitudeSummary:
    """Rows of |x| as weighted points: per point its mean position, count, sum and sum of
    squares (the exact values themselves when the row is short, histogram bins otherwise)."""

    position: torch.Tensor  # (R, K)
    count: torch.Tensor  # (R, K)
    total: torch.Tensor  # (R, K)
    squares: torch.Tensor  # (R, K)

    @classmethod
    def of(cls, magnitude: torch.Tensor, bins: int) -> MagnitudeSummary:
        if magnitude.shape[1] <= bins:
            return cls(magnitude, torch.ones_like(magnitude), magnitude, magnitude.square())
        peak = magnitude.max(1, keepdim=True).values.clamp_min(TINY_CLIP)
        index = (magnitude / peak * bins).long().clamp_(max=bins - 1)
        shape = (magnitude.shape[0], bins)
        count = magnitude.new_zeros(shape).scatter_add_(1, index, torch.ones_like(magnitude))
        total = magnitude.new_zeros(shape).scatter_add_(1, index, magnitude)
        squares = magnitude.new_zeros(shape).scatter_add_(1, index, magnitude.square())
        position = torch.where(count > 0, total / count.clamp_min(1.0), magnitude.new_zeros(()))
        return cls(position, count, total, squares)

    def model_clip(self, coef: float, max_iter: int = 100, rtol: float = 1e-7) -> torch.Tensor:
        """The fixed point of the uniform-noise model (``fixed_point_clip``) on this summary."""
        peak = torch.where(self.count > 0, self.position, self.position.new_zeros(()))
        upper = peak.max(1).values.clamp_min(TINY_CLIP)
        positive = torch.where(self.position > 0, self.count, self.count.new_zeros(())).sum(1)
        clip = (self.total.sum(1) / self.count.sum(1)).clamp(TINY_CLIP, None).minimum(upper)
        for _ in range(max_iter):
            outside = self.position > clip.unsqueeze(1)
            numerator = torch.where(outside, self.total, self.total.new_zeros(())).sum(1)
            beyond = torch.where(outside, self.count, self.count.new_zeros(())).sum(1)
            denominator = coef * (positive - beyond) + beyond
            new = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), clip)
            new = new.clamp(TINY_CLIP, None).minimum(upper)
            if bool(((new - clip).abs() <= rtol * clip).all()):
                return new
            clip = new
        return clip

    def error(self, clips: torch.Tensor, bits: int, rounding: str) -> torch.Tensor:
        """J at every clip of ``clips`` (R, M): the exact squared error of the quantizer."""
        rows, points = self.position.shape
        block = max(1, _BLOCK // max(1, points * clips.shape[1]))
        out = []
        for start in range(0, rows, block):
            part = slice(start, start + block)
            s = clips[part].unsqueeze(2)  # (r, M, 1)
            position = self.position[part].unsqueeze(1)  # (r, 1, K)
            outside = position > s
            clipped = self.squares[part].unsqueeze(1) - 2 * s * self.total[part].unsqueeze(1)
            clipped = clipped + s.square() * self.count[part].unsqueeze(1)
            step = 2.0 * s / (2**bits - 1)
            grid = rounding_error((position + s) / step, rounding) * step.square()
            terms = torch.where(outside, clipped, grid * self.count[part].unsqueeze(1))
            out.append(terms.sum(2))
        return torch.cat(out)


def search_size(rows: int, bits: int) -> tuple[int, int, int]:
    """(coarse candidates, histogram bins of a long row, cells refined) for ``rows`` rows.

    A bin must be a small fraction of a grid step, or the summary misses the rounding error's
    saw-tooth in s (nearest rounding at 8 bits): bins grow with the width, ~100 per step of
    the grid over max|x| (one row: 2^B x 96, at least 4,096, at most 65,536). Per-channel rows
    (hundreds of them) get a quarter of that and half the candidates, so they stay affordable.
    Three cells are refined because J can have near-equal minima in different places: with
    two, per-channel clips were up to 1.17% off brute force's; with three, 0.08% (for 40% more
    time; ``benchmarks/clip_search.py``)."""
    bins = min(65_536, max(4_096, 96 * 2**bits))
    if rows == 1:
        return 64, bins, 3
    return 32, max(1_024, bins // 4), 3


def _golden(
    summary: MagnitudeSummary,
    left: torch.Tensor,
    right: torch.Tensor,
    bits: int,
    rounding: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip, J) of golden-section search of J on [left, right] per row (the best point seen)."""
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = right - ratio * (right - left), left + ratio * (right - left)
    error_a = summary.error(a.unsqueeze(1), bits, rounding).squeeze(1)
    error_b = summary.error(b.unsqueeze(1), bits, rounding).squeeze(1)
    for _ in range(_GOLDEN_STEPS):
        lower = error_a <= error_b
        right = torch.where(lower, b, right)
        left = torch.where(lower, left, a)
        new_a, new_b = right - ratio * (right - left), left + ratio * (right - left)
        error_new = summary.error(torch.where(lower, new_a, new_b).unsqueeze(1), bits, rounding)
        error_new = error_new.squeeze(1)
        a, b = torch.where(lower, new_a, b), torch.where(lower, a, new_b)
        error_a, error_b = (
            torch.where(lower, error_new, error_b),
            torch.where(lower, error_a, error_new),
        )
    return torch.where(error_a <= error_b, a, b), torch.minimum(error_a, error_b)


def mse_clip(rows: torch.Tensor, bits: int, rounding: str = "stochastic") -> torch.Tensor:
    """Per row of ``rows`` (R, n), the clip minimising the exact squared error J (module
    docstring): candidates on [0.4 s0, min(2.5 s0, max|x|)] around the model optimum s0, then
    golden-section search in the cells of the best few candidates (``search_size``), keeping
    the best point seen. float64 clips (R,). Checked against a brute-force minimiser of J on the
    raw values by ``benchmarks/clip_search.py`` and ``tests/test_cuq.py``."""
    magnitude = rows.detach().abs().double()
    if magnitude.dim() != 2 or magnitude.shape[1] == 0:
        raise ValueError(f"rows must be a non-empty 2-D tensor, got shape {tuple(rows.shape)}")
    peak = magnitude.max(1).values.clamp_min(TINY_CLIP)
    candidates_count, bins, cells = search_size(magnitude.shape[0], bits)
    summary = MagnitudeSummary.of(magnitude, bins)
    start = summary.model_clip(noise_coefficient(bits, rounding))
    low = (0.4 * start).clamp_min(TINY_CLIP).minimum(peak)
    high = torch.maximum(torch.minimum(2.5 * start, peak), low)
    fractions = torch.linspace(0.0, 1.0, candidates_count, dtype=torch.float64)
    candidates = low.unsqueeze(1) + (high - low).unsqueeze(1) * fractions
    errors = summary.error(candidates, bits, rounding)
    spacing = (high - low) / (candidates_count - 1)
    ranked = errors.topk(min(cells, candidates_count), dim=1, largest=False).indices
    best_clip = candidates.gather(1, ranked[:, :1]).squeeze(1)
    best_error = errors.gather(1, ranked[:, :1]).squeeze(1)
    for rank in range(ranked.shape[1]):
        chosen = candidates.gather(1, ranked[:, rank : rank + 1]).squeeze(1)
        left = torch.maximum(chosen - spacing, low)
        right = torch.minimum(chosen + spacing, high)
        clip, error = _golden(summary, left, right, bits, rounding)
        better = error < best_error
        best_clip = torch.where(better, clip, best_clip)
        best_error = torch.where(better, error, best_error)
    return best_clip.clamp(TINY_CLIP, None).minimum(peak)


def optimal_clip(
    x: torch.Tensor,
    bits: int,
    rounding: str = "stochastic",
    granularity: str = "layer",
    method: str = "mse",
) -> torch.Tensor:
    """float32 clips of ``x``: shape (1,) per layer, (C,) per channel (1-D tensors: always
    (1,)), by ``method`` (module docstring)."""
    rows = tensor_rows(x, granularity)
    if method == "mse":
        clip = mse_clip(rows, bits, rounding)
    elif method == "model":
        clip, _ = fixed_point_clip(rows, noise_coefficient(bits, rounding))
    elif method == "octav":
        clip = octav_clip(rows, bits)
    else:
        raise ValueError(f"clip method must be one of {CLIP_METHODS}, got {method!r}")
    return clip.float().clamp_min(TINY_CLIP)


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
