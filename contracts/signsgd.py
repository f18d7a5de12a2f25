"""SignSGD's and EF-SignSGD's contract: settings, downlink kinds, parameters vs statistics.

Both split the wire state into trainable parameters (which travel as signs) and buffers
(BatchNorm running statistics, which are not gradients and travel as float16 values)
(``core.wire_state.parameter_split``; ``join_state`` puts the two back together).

SignSGD's fit config says which downlink a client got: ``DOWNLINK`` = ``FULL`` (the fp32
model) or ``SIGN`` (the 1-bit voted sign, applied to the global of round ``BASE_ROUND``).
Wire formats: ``compression.sign_codec``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compression.layout import SplitLayout, split_flat
from core.settings import Settings, setting

DOWNLINK = "signsgd-downlink"
BASE_ROUND = "signsgd-base-round"
FULL = "full"
SIGN = "sign"


@dataclass(frozen=True)
class SignSGDSettings(Settings):
    """``signsgd-*`` keys."""

    prefix = "signsgd"
    server_lr: float = setting(
        0.002, "server step size applied to the voted sign", min=0.0, min_inclusive=False, max=100.0
    )


def join_state(
    layout: SplitLayout,
    p_index: list[int],
    b_index: list[int],
    params: np.ndarray,
    buffers: np.ndarray,
) -> list[np.ndarray]:
    """The wire state from flat parameters and flat buffers."""
    state: list[np.ndarray | None] = [None] * (len(p_index) + len(b_index))
    for index, piece in zip(p_index, split_flat(params, layout.quantized_shapes), strict=True):
        state[index] = piece.astype(np.float32).copy()
    for index, piece in zip(b_index, split_flat(buffers, layout.extra_shapes), strict=True):
        state[index] = piece.astype(np.float32).copy()
    return state  # type: ignore[return-value]
