"""Flattening of a model's wire tensors into few large vectors, shared by every codec.

A codec sends one vector per kind of tensor (e.g. all quantized weights, all extras) instead of
one array per tensor, so the ~128-byte ``.npy`` header per array stays negligible. ``SplitLayout``
records the shapes of the two groups, in wire order, so both ends can cut the vectors back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SplitLayout:
    """Shapes of the quantized tensors and of the extras, in wire order."""

    quantized_shapes: tuple[tuple[int, ...], ...]
    extra_shapes: tuple[tuple[int, ...], ...]

    @property
    def quantized_sizes(self) -> list[int]:
        return [int(np.prod(s)) for s in self.quantized_shapes]

    @property
    def num_quantized(self) -> int:
        return sum(self.quantized_sizes)

    @property
    def num_extras(self) -> int:
        return sum(int(np.prod(s)) for s in self.extra_shapes)


def concat_flat(arrays: Sequence[np.ndarray], dtype: str | np.dtype) -> np.ndarray:
    """One 1-D array of ``dtype`` holding every array flattened, in order."""
    if not arrays:
        return np.zeros(0, dtype=dtype)
    return np.concatenate([np.asarray(a).reshape(-1) for a in arrays]).astype(dtype, copy=False)


def split_flat(flat: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Inverse of ``concat_flat``: views of ``flat`` reshaped to ``shapes``."""
    sizes = [int(np.prod(s)) for s in shapes]
    if flat.size != sum(sizes):
        raise ValueError(f"expected {sum(sizes)} scalars, got {flat.size}")
    pieces = np.split(flat, np.cumsum(sizes)[:-1]) if sizes else []
    return [piece.reshape(shape) for piece, shape in zip(pieces, shapes, strict=True)]


#: dtypes the tensors that are not quantized (biases, BatchNorm) may travel in, for every method.
EXTRAS_DTYPES = ("float16", "float32")


def checked_floats(
    array: np.ndarray, shape: tuple[int, ...], name: str, dtypes: Sequence[str]
) -> np.ndarray:
    """A received float array as float32, after checking its dtype, shape and finiteness.

    Every codec's decoder validates its side arrays (scales, clips, extras) here, so a malformed
    client payload fails with one kind of message naming the array and what is wrong.
    """
    array = np.asarray(array)
    if array.dtype.name not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(dtypes)}, got {array.dtype}")
    if array.shape != tuple(shape):
        expected = f"{shape[0]} values" if len(shape) == 1 else f"shape {tuple(shape)}"
        raise ValueError(f"{name} must hold {expected}, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contain NaN or infinity")
    return array.astype(np.float32, copy=False)
