"""FedBAT's contract: settings and the uplink layout (``compression.fedbat_codec``).

The downlink is the float32 global model; the uplink carries the sign bits of each client's
binarized update of every Conv2d/Linear weight, one step size per such tensor, and the extras.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compression.fedbat_codec import FedBATUplinkCodec
from compression.layout import EXTRAS_DTYPES
from core.settings import ConfigError, Settings, setting
from core.wire_state import quantized_split

#: how phi * T becomes a whole number of warm-up steps: the authors binarize once
#: ``iter > phi * T`` (iter from 1), i.e. after floor(phi * T) full-precision steps.
WARMUP_ROUNDINGS = ("floor", "ceil")


@dataclass(frozen=True)
class FedBATSettings(Settings):
    """``fedbat-*`` keys."""

    prefix = "fedbat"
    paper_literal = {"fedbat-extras-dtype": "float32", "fedbat-warmup-rounding": "floor"}
    rho: float = setting(
        6.0, "rho: pace of the step size a0*exp(rho*a_e) (0: a fixed a0)", min=0.0, max=100.0
    )
    warmup: float = setting(
        0.5, "phi: share of local steps trained in full precision", min=0.0, max=1.0
    )
    warmup_rounding: str = setting(
        "floor",
        "warm-up steps floor(phi*T) as the authors' code, or ceil(phi*T)",
        choices=WARMUP_ROUNDINGS,
    )
    alpha_min: float = setting(
        5e-4, "lower clamp of the step size", min=0.0, min_inclusive=False, max=10.0
    )
    alpha_max: float = setting(
        5e-2, "upper clamp of the step size", min=0.0, min_inclusive=False, max=10.0
    )
    lr: float = setting(
        0.02, "learning rate of the updates and step sizes", min=0.0, min_inclusive=False, max=100.0
    )
    extras_dtype: str = setting(
        "float16", "dtype of biases/BatchNorm on the uplink", choices=EXTRAS_DTYPES
    )

    def __post_init__(self) -> None:
        if self.alpha_min >= self.alpha_max:
            raise ConfigError(
                f"fedbat-alpha-min ({self.alpha_min:g}) must be below "
                f"fedbat-alpha-max ({self.alpha_max:g})"
            )


def uplink_codec(settings: FedBATSettings, model: nn.Module) -> FedBATUplinkCodec:
    """The 1-bit uplink of ``model`` (Conv2d/Linear updates binarized, the rest extras)."""
    return FedBATUplinkCodec(quantized_split(model)[2], settings.extras_dtype)
