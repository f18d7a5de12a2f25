"""Clipped uniform quantization's contract: settings and both directions' layouts.

Uplink: B-bit codes of every Conv2d/Linear weight (or one width per tensor, ``cuq-layer-bits``)
with clips chosen by ``cuq-clip`` and the per-tensor squared errors the server weights by;
downlink: fp32, or B'-bit codes and clips when ``cuq-downlink-bits`` > 0. Wire formats:
``compression.cuq_codec``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compression.clipping import CLIP_METHODS, GRANULARITIES, ROUNDINGS
from compression.cuq_codec import CuqCodec, CuqLayout
from compression.layout import EXTRAS_DTYPES
from core.settings import ConfigError, Settings, setting
from core.wire_state import quantized_split

AGGREGATIONS = ("inverse-sqe", "fedavg")


@dataclass(frozen=True)
class ClippedUQSettings(Settings):
    """``cuq-*`` keys."""

    prefix = "cuq"
    paper_literal = {
        "cuq-weight-cap": 0.0,  # the paper's inverse-error weights, unbounded
        "cuq-clip": "octav",  # the authors' 10 float32 iterations
        "cuq-qat": True,  # they quantize in every training forward pass
        "cuq-rounding": "stochastic",
    }
    bits: int = setting(4, "B: bits per quantized weight (uplink)", choices=(2, 3, 4, 8))
    rounding: str = setting("stochastic", "rounding onto the grid", choices=ROUNDINGS)
    granularity: str = setting("layer", "one clip per layer or per channel", choices=GRANULARITIES)
    qat: bool = setting(False, "quantization-aware local training (STE)")
    aggregation: str = setting("inverse-sqe", "per-layer client weights", choices=AGGREGATIONS)
    weight_cap: float = setting(
        10.0,
        "inverse-sqe: no client's weight in a layer above this many times the layer's lower "
        "median weight (a client reporting error 0 cannot take the layer); 0 = the paper's "
        "weights, unbounded",
        min=0.0,
        max=1e6,
    )
    downlink_bits: int = setting(
        0, "bits of the quantized downlink (0 = fp32)", choices=(0, 2, 3, 4, 8)
    )
    extras_dtype: str = setting(
        "float16", "dtype of biases/BatchNorm on the wire", choices=EXTRAS_DTYPES
    )
    clip: str = setting(
        "mse",
        "clip: exact-MSE search, the uniform-noise model, or the authors' OCTAV iteration",
        choices=CLIP_METHODS,
    )
    layer_bits: str = setting(
        "", "per-tensor uplink widths, comma-separated in wire order ('' = cuq-bits for all)"
    )

    def __post_init__(self) -> None:
        self.widths_for(None)  # malformed widths fail when the config is loaded

    def widths_for(self, count: int | None) -> tuple[int, ...]:
        """The per-tensor uplink widths for ``count`` quantized tensors (empty: uniform)."""
        if not self.layer_bits:
            return ()
        try:
            widths = tuple(int(part) for part in self.layer_bits.split(","))
        except ValueError:
            raise ConfigError(
                f"cuq-layer-bits must be comma-separated integers, got {self.layer_bits!r}"
            ) from None
        if any(not 1 <= w <= 8 for w in widths):
            raise ConfigError(f"cuq-layer-bits must be widths in 1..8, got {self.layer_bits!r}")
        if count is not None and len(widths) != count:
            raise ConfigError(
                f"cuq-layer-bits has {len(widths)} widths but the model has {count} "
                "quantized tensors (Conv2d/Linear weights)"
            )
        return widths


def uplink_codec(settings: ClippedUQSettings, model: nn.Module, entropy: str = "none") -> CuqCodec:
    """Client -> server messages of this run (codes, clips, errors, extras); ``entropy`` is
    the run's ``entropy`` key."""
    split = quantized_split(model)[2]
    widths = settings.widths_for(len(split.quantized_shapes))
    layout = CuqLayout(split, settings.bits, settings.granularity, widths, entropy)
    return CuqCodec(layout, with_errors=True, extras_dtype=settings.extras_dtype)


def downlink_codec(
    settings: ClippedUQSettings, model: nn.Module, entropy: str = "none"
) -> CuqCodec | None:
    """Server -> client messages, or ``None`` when the downlink is the fp32 model."""
    if settings.downlink_bits == 0:
        return None
    split = quantized_split(model)[2]
    layout = CuqLayout(split, settings.downlink_bits, settings.granularity, (), entropy)
    return CuqCodec(layout, with_errors=False, extras_dtype=settings.extras_dtype)
