"""LBI-FL's contract: settings, bit-width modes, the metrics a client reports, the wire layout.

Each client trains at its own widths (k_w, k_a, k_g) and reports, with every upload, the widths
it trained at (``WEIGHT_BITS``, ``ACTIVATION_BITS``, ``GRADIENT_BITS``), the weight width of
its next downlink (``NEXT_WEIGHT_BITS``, so the server quantizes that client's next message at
the width it will train at), the policy's action, the round's training BitOPs with the INT8
figure for the same work, and the Eq. 5 losses. Weights travel at k_w bits both ways
(``compression.lbi_codec``), or as the fp32 wire state in ``fp32`` mode.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from compression import int8_matmul, lbi_codec
from compression.layout import EXTRAS_DTYPES
from compression.lowbit import FP32, INT4, INT8, KINDS, LAYER_CHOICES, WIDENINGS, BitWidths
from core.settings import ConfigError, Settings, setting
from core.wire_state import quantized_split

MODES = ("agent", "random", "fp32", "ui4", "ui8", "fixed")
#: widths ``lbi-mode=fixed`` accepts per tensor kind (the agent's action space).
FIXED_CHOICES = (4, 6, 8)
SCALES = ("channel", "tensor")
#: widths a client starts at in each mode (``agent``/``random`` then only raise them).
INITIAL_WIDTHS: dict[str, BitWidths] = {
    "agent": INT4,
    "random": INT4,
    "fp32": FP32,
    "ui4": INT4,
    "ui8": INT8,
}

WEIGHT_BITS = "lbi-weight-bits"
ACTIVATION_BITS = "lbi-activation-bits"
GRADIENT_BITS = "lbi-gradient-bits"
NEXT_WEIGHT_BITS = "lbi-next-weight-bits"
ACTION = "lbi-action"
BITOPS = "bitops"
BITOPS_INT8 = "bitops-int8"
#: the width metrics, by tensor kind (``compression.lowbit.KINDS``), then the next weight width.
WIDTH_METRICS: tuple[str, ...] = (WEIGHT_BITS, ACTIVATION_BITS, GRADIENT_BITS, NEXT_WEIGHT_BITS)


def allowed_widths(mode: str) -> frozenset[int]:
    """The widths a client of ``mode`` can report: fixed in fp32/ui4/ui8; INT4 raised by 2 up
    to INT8 by the agent or the random policy."""
    if mode == "fp32":
        return frozenset({FP32.weight})
    if mode in ("ui4", "ui8"):
        return frozenset({INITIAL_WIDTHS[mode].weight})
    return frozenset({4, 6, 8})


def loss_metric(kind: str) -> str:
    """Metric of the Eq. 5 quantization loss of a tensor kind."""
    return f"lbi-loss-{kind}"


def width_metric(kind: str) -> str:
    """Metric of the width a tensor kind was trained at."""
    return WIDTH_METRICS[KINDS.index(kind)]


@dataclass(frozen=True)
class LBISettings(Settings):
    """``lbi-*`` keys."""

    prefix = "lbi"
    mode: str = setting("agent", "bit-width policy", choices=MODES)
    fixed_widths: str = setting(
        "4,4,8",
        "lbi-mode=fixed: weight,activation,gradient widths, each 4, 6 or 8 (an ablation: which "
        "tensor's width matters)",
    )
    start: int = setting(10, "first round the policy may change widths", min=1, max=100_000)
    interval: int = setting(5, "rounds between two decisions of a client", min=1, max=100_000)
    layers: str = setting("conv-linear", "layers trained in low bit", choices=LAYER_CHOICES)
    scale_interval: int = setting(
        100, "training steps between weight/activation scale updates", min=1, max=100_000
    )
    scale_widening: str = setting(
        "none",
        "scales that grow at once when outgrown between refreshes (none: the paper's stale scales)",
        choices=WIDENINGS,
    )
    weight_scale: str = setting(
        "channel", "weight scales per output channel, or per tensor (the paper)", choices=SCALES
    )
    wire_rounding: str = setting(
        "stochastic", "rounding of weights on the wire (both ways)", choices=lbi_codec.ROUNDINGS
    )
    extras_dtype: str = setting(
        "float16", "dtype of biases/BatchNorm on the wire", choices=EXTRAS_DTYPES
    )
    uplink_reference: bool = setting(
        False,
        "alias of uplink-reference=received for LBI-FL (kept for older configs): upload the "
        "weight codes as their difference from the codes received this round",
    )
    agent_file: str = setting("", "agent JSON ('' = the shipped clients/lbi_agent.json)")
    int8_kernels: str = setting(
        "auto",
        "INT8 products on integer GEMM kernels: auto (on CUDA where the kernel is exact), "
        "always, never (fake quantization; faster for small products)",
        choices=int8_matmul.MODES,
    )

    @property
    def quantized_wire(self) -> bool:
        """Weights travel as k_w-bit codes (every mode but ``fp32``)."""
        return self.mode != "fp32"

    def __post_init__(self) -> None:
        _ = self.parsed_fixed_widths  # a bad lbi-fixed-widths fails at start, in every mode

    @property
    def parsed_fixed_widths(self) -> BitWidths:
        parts = [p.strip() for p in str(self.fixed_widths).split(",")]
        if len(parts) != 3 or not all(p in {str(c) for c in FIXED_CHOICES} for p in parts):
            raise ConfigError(
                f"lbi-fixed-widths must be three of {FIXED_CHOICES} as 'weight,activation,"
                f"gradient', got {self.fixed_widths!r}"
            )
        return BitWidths(*(int(p) for p in parts))

    @property
    def initial_widths(self) -> BitWidths:
        return self.parsed_fixed_widths if self.mode == "fixed" else INITIAL_WIDTHS[self.mode]

    def reportable_widths(self, metric: str) -> frozenset[int]:
        """The values width ``metric`` (``WIDTH_METRICS``) can take in this run: the mode's
        (``allowed_widths``), or in ``fixed`` mode exactly that kind's width."""
        if self.mode != "fixed":
            return allowed_widths(self.mode)
        fixed = self.parsed_fixed_widths
        if metric == NEXT_WEIGHT_BITS:
            return frozenset({fixed.weight})
        return frozenset({fixed.get(KINDS[WIDTH_METRICS.index(metric)])})


def weight_codec(
    settings: LBISettings, model: nn.Module, entropy: str = "none", uplink_reference: str = "none"
) -> lbi_codec.LBIWeightCodec:
    """The k_w-bit message of ``model`` (both directions); ``entropy`` and ``uplink_reference``
    are the run's keys (``lbi-uplink-reference=true``, the older key, means ``received``)."""
    return lbi_codec.LBIWeightCodec(
        quantized_split(model)[2],
        settings.extras_dtype,
        per_channel=settings.weight_scale == "channel",
        entropy=entropy,
        reference=settings.uplink_reference or uplink_reference == "received",
    )
