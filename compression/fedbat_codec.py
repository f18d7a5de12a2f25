"""Wire format of FedBAT uplink messages (pure NumPy; both ends know the model's tensor shapes).

The model's wire tensors split as in ``compression.layout.SplitLayout``: the L binarized
tensors (Conv2d/Linear weights, d scalars in wire order) and the extras (biases, BatchNorm
parameters and running statistics, e scalars). The downlink is the plain fp32 global model, as in
the paper. The uplink (``FedBATUplinkCodec``) is 3 arrays:

    0. uint8 ``pack_codes(bits, 1)``: one bit per binarized scalar of the client's update,
       1 = +alpha_l, 0 = -alpha_l, in wire order, LSB first; ceil(d / 8) bytes;
    1. float32 (L,): the step size alpha_l of each binarized tensor (positive, finite);
    2. float16 (default) or float32 (e,): the client's trained extras (values, not deltas).

The update a client stands for is exactly ``alpha_l * (2 b - 1)`` per scalar (``rebuild_update``):
both ends compute it in float32 from the same float32 alpha, so the server's copy is bit-exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compression.codec import Codec
from compression.layout import SplitLayout, checked_floats
from compression.packing import pack_codes, packed_size, unpack_codes


@dataclass(frozen=True)
class UplinkMessage:
    """Bits (d,) uint8 0/1, alphas (L,) float32, extras (e,)."""

    bits: np.ndarray
    alphas: np.ndarray
    extras: np.ndarray


@dataclass(frozen=True)
class FedBATUplinkCodec(Codec[UplinkMessage]):
    """The 1-bit uplink; ``extras_dtype`` is what the client sends."""

    split: SplitLayout
    extras_dtype: str = "float16"
    name = "FedBAT uplink"
    num_arrays = 3

    def encode(self, message: UplinkMessage) -> list[np.ndarray]:
        return [
            pack_codes(message.bits, 1),
            np.asarray(message.alphas, dtype=np.float32),
            np.asarray(message.extras).astype(self.extras_dtype, copy=False),
        ]

    def _decode(self, arrays: list[np.ndarray]) -> UplinkMessage:
        packed, alphas, extras = arrays
        bits = unpack_codes(packed, 1, self.split.num_quantized)
        layers = len(self.split.quantized_shapes)
        alphas = checked_floats(alphas, (layers,), "alphas", ("float32",))
        if np.any(alphas <= 0):
            raise ValueError("alphas must be positive")
        extras = checked_floats(extras, (self.split.num_extras,), "extras", (self.extras_dtype,))
        return UplinkMessage(bits, alphas, extras)

    def payload_nbytes(self, message: UplinkMessage | None = None) -> int:
        return (
            packed_size(self.split.num_quantized, 1)
            + 4 * len(self.split.quantized_shapes)
            + self.split.num_extras * np.dtype(self.extras_dtype).itemsize
        )


def rebuild_update(bits: np.ndarray, alphas: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """The binarized update (d,) float32: alpha_l * (2 b - 1) for the scalars of tensor l."""
    if len(alphas) != len(sizes) or bits.size != sum(sizes):
        raise ValueError("bits/alphas do not match the layout")
    per_scalar = np.repeat(np.asarray(alphas, dtype=np.float32), sizes)
    return np.where(bits.astype(bool), per_scalar, -per_scalar)
