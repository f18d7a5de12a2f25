"""Contracts of the update-quantization baselines: FedPAQ, QSGD, FedDQ and DAdaQuant.

Clients train normally and send a quantized update delta = local - received (all wire tensors
concatenated in wire order); the downlink is the fp32 global model. Quantizers and wire formats:
``compression.update_quantizers``. DAdaQuant's server assigns each client its level per round in
the fit-config entry ``DADAQUANT_LEVELS``.
"""

from __future__ import annotations

from dataclasses import dataclass

from compression.update_quantizers import MAX_SYMMETRIC_LEVELS
from core.settings import Settings, setting

DADAQUANT_LEVELS = "dadaquant-levels"


@dataclass(frozen=True)
class FedPAQSettings(Settings):
    """``fedpaq-*`` keys."""

    prefix = "fedpaq"
    bits: int = setting(4, "bits per update scalar (FedPAQ)", min=2, max=8)

    @property
    def levels(self) -> int:
        """Levels per side of a b-bit symmetric code: 2^(b-1) - 1 (2^b - 1 codes)."""
        return 2 ** (self.bits - 1) - 1


@dataclass(frozen=True)
class QSGDSettings(Settings):
    """``qsgd-*`` keys."""

    prefix = "qsgd"
    levels: int = setting(15, "s: magnitude levels of QSGD", min=1, max=255)
    bucket_size: int = setting(512, "scalars sharing one L2 norm (QSGD)", min=1, max=2**31 - 1)


@dataclass(frozen=True)
class FedDQSettings(Settings):
    """``feddq-*`` keys."""

    prefix = "feddq"
    step: float = setting(
        0.005, "fixed quantization step (FedDQ)", min=0.0, min_inclusive=False, max=100.0
    )


@dataclass(frozen=True)
class DAdaQuantSettings(Settings):
    """``dadaquant-*`` keys."""

    prefix = "dadaquant"
    initial_levels: int = setting(
        1, "q at round 1 (levels per side)", min=1, max=MAX_SYMMETRIC_LEVELS
    )
    patience: int = setting(2, "rounds without loss improvement that double q", min=1, max=1_000)
    ema: float = setting(0.5, "weight of the past in the loss moving average", min=0.0, max=0.99)
