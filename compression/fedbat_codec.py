"""Wire format of FedBAT uplink messages (pure NumPy; both ends know the model's tensor shapes).

The model's wire tensors split as in ``compression.fedbif_codec.SplitLayout``: the L binarized
tensors (Conv2d/Linear weights, d scalars in wire order) and the extras (biases, BatchNorm
parameters and running statistics, e scalars). The downlink is the plain fp32 global model, as in
the paper. The uplink is 3 arrays:

    0. uint8 ``pack_codes(bits, 1)``: one bit per binarized scalar of the client's update,
       1 = +alpha_l, 0 = -alpha_l, in wire order, LSB first; ceil(d / 8) bytes;
    1. float32 (L,): the step size alpha_l of each binarized tensor (positive, finite);
    2. float16 (default) or float32 (e,): the client's trained extras (values, not deltas).

The update a client stands for is exactly ``alpha_l * (2 b - 1)`` per scalar (``rebuild_update``):
both ends compute it in float32 from the same float32 alpha, so the server's copy is bit-exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from compression.layout import SplitLayout, checked_floats
from compression.packing import pack_codes, unpack_codes

EXTRAS_DTYPES = ("float16", "float32")
NUM_ARRAYS = 3


def encode_uplink(bits: np.ndarray, alphas: np.ndarray, extras: np.ndarray) -> list[np.ndarray]:
    """Uplink arrays from the concatenated bits (d,), per-tensor alphas (L,) and extras (e,)."""
    return [pack_codes(bits, 1), np.asarray(alphas, dtype=np.float32), extras]


def decode_uplink(
    arrays: Sequence[np.ndarray], layout: SplitLayout
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bits (d,) uint8, alphas (L,) float32, extras (e,) float32); ``ValueError`` says why not."""
    if len(arrays) != NUM_ARRAYS:
        raise ValueError(f"FedBAT uplink has {NUM_ARRAYS} arrays, got {len(arrays)}")
    packed, alphas, extras = arrays
    bits = unpack_codes(packed, 1, layout.num_quantized)
    alphas = checked_floats(alphas, (len(layout.quantized_shapes),), "alphas", ("float32",))
    if np.any(alphas <= 0):
        raise ValueError("alphas must be positive")
    extras = checked_floats(extras, (layout.num_extras,), "extras", EXTRAS_DTYPES)
    return bits, alphas, extras


def rebuild_update(bits: np.ndarray, alphas: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """The binarized update (d,) float32: alpha_l * (2 b - 1) for the scalars of tensor l."""
    if len(alphas) != len(sizes) or bits.size != sum(sizes):
        raise ValueError("bits/alphas do not match the layout")
    per_scalar = np.repeat(np.asarray(alphas, dtype=np.float32), sizes)
    return np.where(bits.astype(bool), per_scalar, -per_scalar)
