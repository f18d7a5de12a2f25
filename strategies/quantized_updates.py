"""FedPAQ, QSGD and FedDQ: unbiased stochastic quantization of the client update, fp32 downlink.

* FedPAQ (Reisizadeh et al. 2020): ``fedpaq-bits`` b, per-tensor max-abs scale, codes in
  [-(2^(b-1) - 1), 2^(b-1) - 1].
* QSGD (Alistarh et al. 2017): ``qsgd-levels`` s, L2 norm per bucket of ``qsgd-bucket-size``
  scalars, sign bits packed apart from the magnitudes.
* FedDQ (Qu et al. 2022): fixed step ``feddq-step``; each tensor gets the smallest width that
  covers its update's range, so widths fall as training converges. ``rounds.csv`` gains
  ``feddq_bits`` (mean code width per scalar over the round's clients) and the per-tensor widths
  are logged every round.

Contracts: ``contracts.update_quantization``; wire formats: ``compression.update_quantizers``.
"""

from __future__ import annotations

from logging import INFO
from typing import Any

import numpy as np
from flwr.common.logger import log

from compression.update_quantizers import (
    FixedStepCodec,
    QSGDCodec,
    SymmetricCodec,
    dequantize_fixed_step,
    dequantize_qsgd,
    dequantize_symmetric,
)
from contracts.update_quantization import FedDQSettings, FedPAQSettings, QSGDSettings
from strategies.base import ClientReply, ClientUpdate
from strategies.delta import DeltaStrategy


class FedPAQStrategy(DeltaStrategy):
    """FedPAQ server: decode b-bit updates, example-weighted mean."""

    entropy_codes = True

    uplink_name = "FedPAQ uplink"
    settings: FedPAQSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.codec = SymmetricCodec(self.sizes, self.settings.levels, self.cfg.entropy)

    def decode_delta(self, server_round: int, reply: ClientReply) -> np.ndarray:
        return dequantize_symmetric(self.codec.decode(reply.arrays), self.sizes)


class QSGDStrategy(DeltaStrategy):
    """QSGD server: decode norm-scaled s-level updates, example-weighted mean."""

    entropy_codes = True

    uplink_name = "QSGD uplink"
    settings: QSGDSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        levels, bucket = self.settings.levels, self.settings.bucket_size
        self.codec = QSGDCodec(self.num_flat, levels, bucket, self.cfg.entropy)

    def decode_delta(self, server_round: int, reply: ClientReply) -> np.ndarray:
        message = self.codec.decode(reply.arrays)
        return dequantize_qsgd(message, self.settings.levels, self.settings.bucket_size)


class FedDQStrategy(DeltaStrategy):
    """FedDQ server: decode variable-width updates; records the chosen widths."""

    uplink_name = "FedDQ uplink"
    round_columns = {"feddq_bits": float("nan")}
    settings: FedDQSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.codec = FixedStepCodec(self.sizes)

    def decode_update(self, server_round: int, reply: ClientReply) -> ClientUpdate:
        message = self.codec.decode(reply.arrays)
        update = self.delta_update(reply, dequantize_fixed_step(message, self.sizes))
        update.arrays.append(message.widths.astype(np.float64))  # for feddq_bits
        return update

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        widths = [u.arrays[0] for u in updates]
        sizes = np.asarray(self.sizes, dtype=np.float64)
        mean_width = float(np.mean([w @ sizes / sizes.sum() for w in widths]))
        per_tensor = np.mean(widths, axis=0)
        log(
            INFO,
            "[feddq] round %d: mean width %.3f bits; per tensor %s",
            server_round,
            mean_width,
            " ".join(f"{w:.1f}" for w in per_tensor),
        )
        self.record_metrics(server_round, feddq_bits=mean_width)
        return super().aggregate(server_round, updates)
