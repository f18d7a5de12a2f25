"""FedBiF's contract: settings, activated-bit schedule, fit-config entry and wire layout.

The server quantizes every Conv2d/Linear weight to m bits and picks, per round, the bit positions
all clients of the round train (``select_active_bits``); it tells them with the fit-config entry
``ACTIVE_MASK`` (bit p set = position p activated). Wire formats: ``compression.fedbif_codec``,
built for a model by ``downlink_codec`` / ``uplink_codec``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compression.bits import LAYOUTS, BitLayout
from compression.fedbif_codec import FedBiFDownlinkCodec, FedBiFUplinkCodec
from compression.layout import EXTRAS_DTYPES
from core.seeding import numpy_rng
from core.settings import ConfigError, Settings, setting
from core.wire_state import quantized_split

SELECTORS = ("sequential", "fixed", "random")
STE_MODES = ("identity", "chain", "place")
#: fit-config entry: bit mask of the round's activated positions.
ACTIVE_MASK = "fedbif-active-mask"


@dataclass(frozen=True)
class FedBiFSettings(Settings):
    """``fedbif-*`` keys."""

    prefix = "fedbif"
    paper_literal = {
        "fedbif-ste": "chain",  # dtheta/dv through the step as identity: the chain rule
        "fedbif-extras-dtype": "float32",  # the paper compresses no BatchNorm or bias
        "fedbif-server-model": "quantized",  # Eq. 6
        "fedbif-rounding": "stochastic",  # Eq. 2
    }
    bits: int = setting(4, "m: bits per quantized weight (downlink)", min=2, max=8)
    active_bits: int = setting(1, "s: bits clients train and send per weight", min=1, max=8)
    selector: str = setting("sequential", "which bits are activated each round", choices=SELECTORS)
    fixed_bit: int = setting(2, "highest activated bit (0 = LSB) for selector=fixed", min=0, max=7)
    vbi: bool = setting(True, "virtual bits inheritance across a client's rounds")
    sign_bit: bool = setting(False, "ablation: sign bit + (m-1) magnitude bits")
    weighting: str = setting(
        "uniform", "aggregation weights (Eq. 6 is uniform)", choices=("uniform", "examples")
    )
    rounding: str = setting(
        "stochastic", "server quantizer rounding (Eq. 2)", choices=("stochastic", "deterministic")
    )
    extras_dtype: str = setting(
        "float16", "dtype of biases/BatchNorm on the wire", choices=EXTRAS_DTYPES
    )
    lr: float = setting(
        0.05, "learning rate of the virtual bits", min=0.0, min_inclusive=False, max=100.0
    )
    init_scale: float = setting(
        1.0,
        "factor on the Kaiming std of fresh virtual-bit magnitudes (drawn as abs(N(0, 2/fan_in))); "
        "larger: bits flip later",
        min=0.0,
        min_inclusive=False,
        max=1000.0,
    )
    server_model: str = setting(
        "quantized",
        "quantized: Eq. 6, the mean of the clients' quantized weights becomes the global model "
        "(the downlink's rounding error stays in it, round after round); float (beyond the "
        "paper): the server keeps its float model and adds the clients' mean change against "
        "the quantized weights they were sent",
        choices=("quantized", "float"),
    )
    ste: str = setting(
        "identity",
        "virtual-bit gradient: identity (dw/dv = 1, the paper), chain (dL/dw * alpha * 2^p), "
        "or place (beyond the paper: identity / 2^p, so flipping bit p takes 2^p times the "
        "push of the LSB, as it moves the weight 2^p times as far)",
        choices=STE_MODES,
    )

    def ste_scale(self, step: float, position: int) -> float:
        """Factor on the chain-rule gradient reaching the virtual bit of ``position`` (the
        weight is step * (... + 2^p h(v)), so the chain rule alone gives dL/dw * step * 2^p)."""
        place = step * 2.0**position
        if self.ste == "identity":
            return 1.0 / place
        if self.ste == "place":
            return 1.0 / (place * 2.0**position)
        return 1.0

    def __post_init__(self) -> None:
        # An impossible selector setting fails at start, not in round 1.
        try:
            self.active_positions(1, seed=0)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    @property
    def layout(self) -> BitLayout:
        """The integer layout of the run (offset, or sign-magnitude for the ablation)."""
        return BitLayout(self.bits, LAYOUTS[1] if self.sign_bit else LAYOUTS[0])

    def active_positions(self, server_round: int, seed: int) -> tuple[int, ...]:
        """The bit positions activated in ``server_round`` (see ``select_active_bits``)."""
        return select_active_bits(
            self.selector, server_round, self.bits, self.active_bits, self.fixed_bit, seed
        )


def select_active_bits(
    selector: str, server_round: int, bits: int, active: int, fixed_bit: int, seed: int
) -> tuple[int, ...]:
    """Activated bit positions (ascending; 0 = LSB) of a round, shared by all its clients.

    ``sequential`` walks the bits from the MSB down in non-overlapping windows of ``active``
    bits, so every bit is trained once within m / s rounds; ``fixed`` always trains the window
    whose highest bit is ``fixed_bit``; ``random`` draws ``active`` distinct bits per (seed, round).
    """
    if not 1 <= active <= bits:
        raise ValueError(f"fedbif-active-bits must be in 1..{bits}, got {active}")
    if selector == "sequential":
        if bits % active:
            raise ValueError(
                f"selector 'sequential' needs fedbif-bits ({bits}) divisible by "
                f"fedbif-active-bits ({active})"
            )
        window = (server_round - 1) % (bits // active)
        top = bits - 1 - window * active
        return tuple(range(top - active + 1, top + 1))
    if selector == "fixed":
        if not active - 1 <= fixed_bit < bits:
            raise ValueError(
                f"fedbif-fixed-bit must be in {active - 1}..{bits - 1}, got {fixed_bit}"
            )
        return tuple(range(fixed_bit - active + 1, fixed_bit + 1))
    if selector == "random":
        rng = numpy_rng(seed, server_round, 0xB1F)
        return tuple(sorted(int(b) for b in rng.choice(bits, size=active, replace=False)))
    raise ValueError(f"fedbif-selector must be one of {SELECTORS}, got {selector!r}")


def positions_to_mask(positions: tuple[int, ...]) -> int:
    return sum(1 << p for p in positions)


def mask_to_positions(mask: int, bits: int) -> tuple[int, ...]:
    return tuple(p for p in range(bits) if mask >> p & 1)


def downlink_codec(
    settings: FedBiFSettings, model: nn.Module, entropy: str = "none", reference: str = "none"
) -> FedBiFDownlinkCodec:
    """The m-bit downlink of ``model`` (Conv2d/Linear weights quantized, the rest extras);
    ``entropy`` and ``reference`` are the run's ``entropy`` and ``downlink-reference`` keys."""
    return FedBiFDownlinkCodec(
        quantized_split(model)[2],
        settings.bits,
        settings.extras_dtype,
        entropy,
        reference=reference == "last",
    )


def uplink_codec(
    settings: FedBiFSettings, model: nn.Module, entropy: str = "none", reference: str = "none"
) -> FedBiFUplinkCodec:
    """The s-bit uplink of ``model``; ``reference`` is the run's ``uplink-reference`` key."""
    return FedBiFUplinkCodec(
        quantized_split(model)[2],
        settings.active_bits,
        settings.extras_dtype,
        entropy,
        reference=reference == "received",
    )
