"""The one surface of every wire format: ``Codec``.

A wire format turns a *message* (a small frozen dataclass of codes, scales and extras, what a
sender computed and a receiver needs) into the list of NumPy arrays that Flower serializes, and
back. Every codec of the project implements the same three methods:

* ``encode(message) -> list[np.ndarray]``: the arrays that go on the wire;
* ``decode(arrays) -> message``: the arrays a peer sent, validated (array count, dtypes, byte
  lengths for the layout, finite values, ranges); ``ValueError`` names the first problem, so a
  malformed client payload is rejected with a reason and never reaches aggregation;
* ``payload_nbytes(message) -> int``: the bytes of the encoded arrays before the ~128-byte
  ``.npy`` header each array gets (the measured bpp counts those headers too).

Both ends build a codec from the same layout (``compression.layout.SplitLayout`` or tensor sizes)
and settings, so nothing about shapes travels. Quantizers, which decide the codes, are separate
functions of each codec's module: the codec only moves bits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Generic, TypeVar

import numpy as np

M = TypeVar("M")


class Codec(ABC, Generic[M]):
    """A wire format; see the module docstring."""

    #: how many arrays a message of this format has.
    num_arrays: int
    #: the format's name in error messages ("FedBiF uplink").
    name: str

    @abstractmethod
    def encode(self, message: M) -> list[np.ndarray]:
        """The arrays of ``message`` as they go on the wire."""

    def decode(self, arrays: Sequence[np.ndarray]) -> M:
        """Validate and unpack received arrays; ``ValueError`` names the first problem."""
        arrays = list(arrays)
        if len(arrays) != self.num_arrays:
            raise ValueError(f"{self.name} has {self.num_arrays} arrays, got {len(arrays)}")
        return self._decode(arrays)

    @abstractmethod
    def _decode(self, arrays: list[np.ndarray]) -> M:
        """``decode`` after the array count was checked."""

    @abstractmethod
    def payload_nbytes(self, message: M) -> int:
        """Bytes of ``encode(message)`` without the ``.npy`` headers."""


def arrays_nbytes(arrays: Sequence[np.ndarray]) -> int:
    """Raw bytes of a list of arrays (no headers)."""
    return sum(int(np.asarray(a).nbytes) for a in arrays)
