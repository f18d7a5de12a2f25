"""Clipped uniform quantization's contract: settings and both directions' layouts.

Uplink: B-bit codes of every Conv2d/Linear weight with MSE-optimal clips and the per-tensor
squared errors the server weights by; downlink: fp32, or B'-bit codes and clips when
``cuq-downlink-bits`` > 0. Wire formats: ``compression.cuq_codec``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compression.clipping import GRANULARITIES, ROUNDINGS
from compression.cuq_codec import CuqCodec, CuqLayout
from compression.layout import EXTRAS_DTYPES
from core.settings import Settings, setting
from core.wire_state import quantized_split

AGGREGATIONS = ("inverse-sqe", "fedavg")


@dataclass(frozen=True)
class ClippedUQSettings(Settings):
    """``cuq-*`` keys."""

    prefix = "cuq"
    bits: int = setting(4, "B: bits per quantized weight (uplink)", choices=(2, 3, 4, 8))
    rounding: str = setting("stochastic", "rounding onto the grid", choices=ROUNDINGS)
    granularity: str = setting("layer", "one clip per layer or per channel", choices=GRANULARITIES)
    qat: bool = setting(False, "quantization-aware local training (STE)")
    aggregation: str = setting("inverse-sqe", "per-layer client weights", choices=AGGREGATIONS)
    downlink_bits: int = setting(
        0, "bits of the quantized downlink (0 = fp32)", choices=(0, 2, 3, 4, 8)
    )
    extras_dtype: str = setting(
        "float16", "dtype of biases/BatchNorm on the wire", choices=EXTRAS_DTYPES
    )


def uplink_codec(settings: ClippedUQSettings, model: nn.Module) -> CuqCodec:
    """Client -> server messages of this run (codes, clips, errors, extras)."""
    split = quantized_split(model)[2]
    layout = CuqLayout(split, settings.bits, settings.granularity)
    return CuqCodec(layout, with_errors=True, extras_dtype=settings.extras_dtype)


def downlink_codec(settings: ClippedUQSettings, model: nn.Module) -> CuqCodec | None:
    """Server -> client messages, or ``None`` when the downlink is the fp32 model."""
    if settings.downlink_bits == 0:
        return None
    split = quantized_split(model)[2]
    layout = CuqLayout(split, settings.downlink_bits, settings.granularity)
    return CuqCodec(layout, with_errors=False, extras_dtype=settings.extras_dtype)
