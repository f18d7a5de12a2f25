"""Wire format of a full-precision model (FedAvg both ways; the fp32 downlink of other methods).

One float32 array per wire tensor, in wire order, each in its own shape. Decoding checks the
count, every shape, the exact dtype (a float64 value that overflows float32 is refused, not
cast to infinity) and finite values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from compression.codec import Codec, arrays_nbytes


class FloatStateCodec(Codec[list[np.ndarray]]):
    """A model's wire state as plain float arrays; the message is the list of arrays."""

    name = "a full-precision model"

    def __init__(self, shapes: Sequence[tuple[int, ...]]) -> None:
        self.shapes = [tuple(shape) for shape in shapes]
        self.num_arrays = len(self.shapes)

    def encode(self, message: list[np.ndarray]) -> list[np.ndarray]:
        return list(message)

    def _decode(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        for index, (array, shape) in enumerate(zip(arrays, self.shapes, strict=True)):
            if array.shape != shape:
                raise ValueError(f"array {index}: expected shape {shape}, got {array.shape}")
            if array.dtype != np.float32:
                raise ValueError(f"array {index}: expected float32, got {array.dtype}")
            if not np.all(np.isfinite(array)):
                raise ValueError(f"array {index}: contains NaN or infinity")
        return arrays

    def payload_nbytes(self, message: list[np.ndarray]) -> int:
        return arrays_nbytes(message)
