"""Pure aggregation helpers the strategies share (NumPy in, NumPy out; no Flower, no state).

Every method reduces a client's message to a *delta*: the change of the global model it
proposes, one float32 vector over the whole wire state in wire order (for a method that sends
weights, client model - global model as received; for one that sends updates, the update;
SignSGD's votes are their own rule, its delta covers the BatchNorm statistics). The base
strategy combines the deltas with bounded influence:

* ``implausible``: a delta ``update-norm-reject`` (100) times longer than the round's lower
  median norm is rejected outright (lower median: of an even count the smaller middle value, so
  that with two clients the hostile one never sets it);
* ``clip_norms``: a delta longer than ``bound`` x the round's lower median norm is scaled down to
  that length (one client cannot move the model further than ``bound`` typical clients can; it
  protects while attackers are fewer than half the round);
* ``combine``: the weighted mean (weights per client, or per client and segment, e.g. the
  inverse-error weights of clipped UQ per layer), or the coordinate-wise trimmed mean or median,
  which ignore weights (a client cannot buy influence with a claimed example count).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.common import Scalar

from compression.layout import concat_flat, split_flat


@dataclass
class ClientUpdate:
    """One decoded client message, ready for aggregation: ``delta`` (module docstring; for
    SignSGD only its BatchNorm statistics' change) and whatever else the method keeps in
    ``arrays``."""

    cid: str
    partition_id: int
    num_examples: int
    arrays: list[np.ndarray]
    metrics: dict[str, Scalar] = field(default_factory=dict)
    delta: np.ndarray | None = None


def example_shares(updates: Sequence[ClientUpdate]) -> list[float]:
    """n_k / n for every update, as Python floats (see ``weighted_sum`` on the precision)."""
    total = sum(u.num_examples for u in updates)
    return [u.num_examples / total for u in updates]


def weighted_average(updates: Sequence[ClientUpdate]) -> list[np.ndarray]:
    """Example-weighted mean of the clients' arrays, accumulated in float64."""
    total = sum(update.num_examples for update in updates)
    result = [np.zeros(a.shape, dtype=np.float64) for a in updates[0].arrays]
    for update in updates:
        weight = update.num_examples / total
        for acc, array in zip(result, update.arrays, strict=True):
            acc += weight * array
    return [acc.astype(np.float32) for acc in result]


def weighted_sum(
    weights: Iterable[float], vectors: Iterable[np.ndarray], start: np.ndarray | None = None
) -> np.ndarray:
    """``start`` + sum_k w_k v_k, accumulated in float64 in client order (``start`` defaults to
    zeros). ``vectors`` may be a generator, so one client's decoded arrays live at a time.

    Each term w_k * v_k follows NumPy's promotion: a Python float weight keeps a float32
    vector's dtype, a NumPy float64 weight makes the term float64."""
    total = None if start is None else np.array(start, dtype=np.float64)
    for weight, vector in zip(weights, vectors, strict=True):
        if total is None:
            total = np.zeros(np.shape(vector), dtype=np.float64)
        total += weight * vector
    if total is None:
        raise ValueError("weighted_sum needs at least one vector or a start")
    return total


def place_flat(
    state: list[np.ndarray],
    indices: list[int],
    flat: np.ndarray,
    shapes: tuple[tuple[int, ...], ...],
) -> None:
    """Write the float32 pieces of a concatenated vector (e.g. the extras) into ``state``."""
    pieces = split_flat(np.asarray(flat, dtype=np.float32), shapes)
    for index, piece in zip(indices, pieces, strict=True):
        state[index] = piece.copy()


def gather_flat(state: Sequence[np.ndarray], indices: Sequence[int], dtype: str) -> np.ndarray:
    """The tensors of ``state`` at ``indices`` concatenated into one vector of ``dtype``."""
    return concat_flat([state[i] for i in indices], dtype)


def mean_metric(updates: Sequence[ClientUpdate], key: str) -> float:
    """Example-weighted mean of a numeric client metric (NaN when no client reported it)."""
    pairs = [
        (float(u.metrics[key]), u.num_examples)
        for u in updates
        if isinstance(u.metrics.get(key), int | float)
    ]
    if not pairs:
        return float("nan")
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total


def lower_median(values: Sequence[float] | np.ndarray) -> Any:
    """The lower median along axis 0 (a float for a sequence, one per column for a matrix):
    with two values the smaller, so one hostile value never sets it."""
    ordered = np.sort(np.asarray(values, dtype=np.float64), axis=0)
    middle = ordered[(ordered.shape[0] - 1) // 2]
    return float(middle) if middle.ndim == 0 else middle


def norms_of(deltas: Sequence[np.ndarray]) -> np.ndarray:
    """L2 norms (float64) of flat deltas."""
    return np.array([np.linalg.norm(np.asarray(d, dtype=np.float64)) for d in deltas])


def implausible(deltas: Sequence[np.ndarray], factor: float) -> list[bool]:
    """Which deltas are longer than ``factor`` x the lower median norm (``factor`` 0: none).

    Honest clients of one round differ in norm by a small factor (partition sizes, data); one
    100 times longer is an attack or a broken device, and clipping it would still let it steer
    the round's direction, so it is rejected instead.
    """
    if factor <= 0 or len(deltas) < 2:
        return [False] * len(deltas)
    norms = norms_of(deltas)
    limit = factor * lower_median(norms.tolist())
    return [bool(limit > 0 and norm > limit) for norm in norms]


def clip_norms(deltas: Sequence[np.ndarray], bound: float) -> tuple[list[np.ndarray], int]:
    """Deltas longer than ``bound`` x their lower median L2 norm scaled to that length; returns
    them and how many were scaled (``bound`` 0: unchanged)."""
    if bound <= 0 or len(deltas) < 2:
        return list(deltas), 0
    norms = norms_of(deltas)
    limit = bound * lower_median(norms.tolist())
    out, clipped = [], 0
    for delta, norm in zip(deltas, norms, strict=True):
        if limit > 0 and norm > limit:
            out.append((delta.astype(np.float64) * (limit / norm)).astype(np.float32))
            clipped += 1
        else:
            out.append(delta)
    return out, clipped


def combine(
    deltas: Sequence[np.ndarray],
    weights: np.ndarray,
    segments: Sequence[int],
    rule: str = "mean",
    trim_fraction: float = 0.0,
) -> np.ndarray:
    """One float64 vector from the clients' deltas (``rule``: mean, trimmed-mean, median).

    ``weights`` are (K,) per client or (K, S) per client and segment, ``segments`` the sizes of
    the S consecutive segments of a delta (their weights summing to 1 over clients); the
    trimmed mean drops ``trim_count(trim_fraction, K)`` values at each end of every coordinate.
    """
    if rule == "mean":
        weights = np.asarray(weights, dtype=np.float64)
        if weights.ndim == 1:
            return weighted_sum(weights, deltas)
        bounds = np.cumsum([0, *segments])
        out = np.empty(int(bounds[-1]), dtype=np.float64)
        for index in range(len(segments)):
            part = slice(int(bounds[index]), int(bounds[index + 1]))
            out[part] = weighted_sum(weights[:, index], (d[part] for d in deltas))
        return out
    stacked = np.stack([np.asarray(d, dtype=np.float64) for d in deltas])
    if rule == "median":
        return np.median(stacked, axis=0)
    if rule == "trimmed-mean":
        cut = trim_count(trim_fraction, len(deltas))
        if cut == 0:
            return stacked.mean(axis=0)
        ordered = np.sort(stacked, axis=0)
        return ordered[cut : len(deltas) - cut].mean(axis=0)
    raise ValueError(f"unknown aggregation rule {rule!r}")


def trim_count(trim_fraction: float, count: int) -> int:
    """Values the trimmed mean drops at each end of a coordinate: ``floor(fraction x count)``,
    at least one from 3 updates on (a default trim of 0.1 would otherwise trim nothing below
    10 updates), and never so many that nothing is left."""
    if trim_fraction <= 0 or count < 3:
        return 0
    return min(max(1, int(np.floor(trim_fraction * count))), (count - 1) // 2)


def robust_shortfall(rule: str, trim_fraction: float, count: int) -> str | None:
    """Why ``rule`` does not protect anything with ``count`` updates (None where it does)."""
    if rule == "trimmed-mean" and trim_fraction > 0 and trim_count(trim_fraction, count) == 0:
        return f"trimmed-mean needs 3 updates to trim one at each end, got {count}: plain mean"
    if rule == "median" and count < 3:
        return f"the median of {count} updates is their mean: one update moves it freely"
    return None


#: the largest magnitude an aggregated model may hold: beyond it the aggregate is refused.
MAX_MAGNITUDE = 1e6


def aggregate_problem(state: Sequence[np.ndarray]) -> str | None:
    """Why an aggregated model must not replace the global one (None if it may)."""
    for index, array in enumerate(state):
        if array.dtype != np.float32 or not np.all(np.isfinite(array)):
            return f"array {index} is not finite float32"
        if array.size and float(np.abs(array).max()) > MAX_MAGNITUDE:
            return f"array {index} holds |w| > {MAX_MAGNITUDE:g}"
    return None
