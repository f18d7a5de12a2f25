"""FedPAQ, QSGD and FedDQ: unbiased stochastic quantization of the client update, fp32 downlink.

* FedPAQ (Reisizadeh et al. 2020): ``fedpaq-bits`` b, per-tensor max-abs scale, codes in
  [-(2^(b-1) - 1), 2^(b-1) - 1].
* QSGD (Alistarh et al. 2017): ``qsgd-levels`` s, L2 norm per bucket of ``qsgd-bucket-size``
  scalars, sign bits packed apart from the magnitudes.
* FedDQ (Qu et al. 2022): fixed step ``feddq-step``; each tensor gets the smallest width that
  covers its update's range, so widths fall as training converges. ``rounds.csv`` gains
  ``feddq_bits`` (mean code width per scalar over the round's clients) and the per-tensor widths
  are logged every round.

Wire formats: ``compression.update_quantizers``.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.common.logger import log

from compression.update_quantizers import decode_fixed_step, decode_qsgd, decode_symmetric
from fl_app.config import ConfigKey
from strategies.base import ClientUpdate
from strategies.delta import DeltaStrategy, expect_arrays

FEDPAQ_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey("fedpaq-bits", int, 4, "bits per update scalar (FedPAQ)", min=2, max=8),
)
QSGD_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey("qsgd-levels", int, 15, "s: magnitude levels of QSGD", min=1, max=255),
    ConfigKey("qsgd-bucket-size", int, 512, "scalars sharing one L2 norm (QSGD)", min=1),
)
FEDDQ_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey(
        "feddq-step", float, 0.005, "fixed quantization step (FedDQ)", min=0.0, min_inclusive=False
    ),
)


def fedpaq_levels(bits: int) -> int:
    """Levels per side of a b-bit symmetric code: 2^(b-1) - 1 (2^b - 1 codes)."""
    return 2 ** (bits - 1) - 1


class FedPAQStrategy(DeltaStrategy):
    """FedPAQ server: decode b-bit updates, example-weighted mean."""

    label = "FedPAQ"

    def decode_delta(self, server_round, cid, arrays, fit_res) -> np.ndarray:  # noqa: ANN001
        expect_arrays(arrays, 2, self.label)
        levels = fedpaq_levels(int(self.cfg["fedpaq-bits"]))
        return decode_symmetric(arrays[0], arrays[1], self.sizes, levels)


class QSGDStrategy(DeltaStrategy):
    """QSGD server: decode norm-scaled s-level updates, example-weighted mean."""

    label = "QSGD"

    def decode_delta(self, server_round, cid, arrays, fit_res) -> np.ndarray:  # noqa: ANN001
        expect_arrays(arrays, 3, self.label)
        return decode_qsgd(
            arrays[0],
            arrays[1],
            arrays[2],
            self.num_flat,
            int(self.cfg["qsgd-levels"]),
            int(self.cfg["qsgd-bucket-size"]),
        )


class FedDQStrategy(DeltaStrategy):
    """FedDQ server: decode variable-width updates; logs the chosen widths."""

    label = "FedDQ"
    extra_columns = ("feddq_bits",)

    def __init__(self, cfg, **kwargs) -> None:  # noqa: ANN001, ANN003
        super().__init__(cfg, **kwargs)
        self._widths: dict[int, list[np.ndarray]] = {}

    def decode_delta(self, server_round, cid, arrays, fit_res) -> np.ndarray:  # noqa: ANN001
        expect_arrays(arrays, 3, self.label)
        delta = decode_fixed_step(arrays[0], arrays[1], arrays[2], self.sizes)
        self._widths.setdefault(server_round, []).append(np.asarray(arrays[2], dtype=np.float64))
        return delta

    def mean_width(self, server_round: int) -> float:
        """Code bits per scalar, averaged over the round's decoded client messages."""
        widths = self._widths.get(server_round)
        if not widths:
            return float("nan")
        sizes = np.asarray(self.sizes, dtype=np.float64)
        return float(np.mean([w @ sizes / sizes.sum() for w in widths]))

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        widths = self._widths.get(server_round, [])
        if widths:
            per_tensor = np.mean(widths, axis=0)
            log(
                INFO,
                "[feddq] round %d: mean width %.3f bits; per tensor %s",
                server_round,
                self.mean_width(server_round),
                " ".join(f"{w:.1f}" for w in per_tensor),
            )
        return super().aggregate(server_round, updates)

    def round_row(self, server_round: int, loss: float, accuracy: float) -> dict:
        row = super().round_row(server_round, loss, accuracy)
        row["feddq_bits"] = self.mean_width(server_round) if server_round > 0 else float("nan")
        return row
