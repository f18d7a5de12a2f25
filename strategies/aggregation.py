"""Pure aggregation helpers the strategies share (NumPy in, NumPy out; no Flower, no state)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.common import Scalar

from compression.layout import concat_flat, split_flat


@dataclass
class ClientUpdate:
    """One decoded client message, ready for aggregation."""

    cid: str
    partition_id: int
    num_examples: int
    arrays: list[np.ndarray]
    metrics: dict[str, Scalar] = field(default_factory=dict)


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
