"""DAdaQuant (Hönig et al., ICML 2022): doubly-adaptive quantization levels, fp32 downlink.

* Time-adaptive: the server keeps an exponential moving average of the clients' mean training loss;
  when it has not improved for ``dadaquant-patience`` rounds in a row (a plateau) the level q
  doubles (capped at 127, the most an 8-bit symmetric code holds). It starts at
  ``dadaquant-initial-levels``: early, coarse updates are cheap.
* Client-adaptive: for data shares w_i of the round's clients, client i gets
  q_i = q * w_i^(2/3) * sqrt(sum_j w_j^(2/3) / sum_j w_j^2) (rounded, at least 1): the
  levels minimizing the sum of levels at the aggregate variance of uniform q (variance ~ 1/q^2),
  so clients with more data send finer updates. Sizes are the ``num_examples`` each client
  reported before; a client not seen yet counts as the mean known size.

The quantizer is the unbiased symmetric max-abs one of ``compression.update_quantizers``
(per-tensor scale, codes in [-q_i, q_i], ceil(log2(2 q_i + 1)) bits). The server tells each client
its q_i in the fit config (``dadaquant-levels``, ``contracts.update_quantization``) and decodes
with the level it sent.
``rounds.csv`` gains ``levels`` (q) and ``client_levels`` (mean q_i of the round).
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.common import Scalar
from flwr.common.logger import log
from flwr.server.client_proxy import ClientProxy

from compression.update_quantizers import (
    MAX_SYMMETRIC_LEVELS,
    SymmetricCodec,
    dequantize_symmetric,
)
from contracts.update_quantization import DADAQUANT_LEVELS, DAdaQuantSettings
from strategies.base import ClientReply, ClientUpdate
from strategies.delta import DeltaStrategy


@dataclass
class PlateauDoubler:
    """Time-adaptive level: doubles q when the loss moving average stops improving."""

    levels: int
    patience: int
    smoothing: float
    max_levels: int = MAX_SYMMETRIC_LEVELS
    average: float | None = None
    best: float = float("inf")
    stale: int = 0

    def observe(self, loss: float) -> int:
        """Feed one round's training loss; returns the level for the next round."""
        if not np.isfinite(loss):
            return self.levels
        if self.average is None:
            self.average = loss
        else:
            self.average = self.smoothing * self.average + (1 - self.smoothing) * loss
        if self.average < self.best:
            self.best, self.stale = self.average, 0
            return self.levels
        self.stale += 1
        if self.stale >= self.patience:
            self.levels = min(2 * self.levels, self.max_levels)
            self.stale = 0
            self.best = self.average  # a new plateau is judged from here
        return self.levels


def client_levels(
    levels: int, sizes: np.ndarray, max_levels: int = MAX_SYMMETRIC_LEVELS
) -> np.ndarray:
    """Per-client levels q_i growing as w_i^(2/3) with the data share w_i (see module docstring)."""
    weights = np.asarray(sizes, dtype=np.float64)
    weights = weights / weights.sum()
    scale = levels * np.sqrt(np.sum(weights ** (2 / 3)) / np.sum(weights**2))
    return np.clip(np.rint(scale * weights ** (2 / 3)), 1, max_levels).astype(np.int64)


class DAdaQuantStrategy(DeltaStrategy):
    """DAdaQuant server; see the module docstring."""

    entropy_codes = True

    uplink_name = "DAdaQuant uplink"
    round_columns = {"levels": float("nan"), "client_levels": float("nan")}
    settings: DAdaQuantSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.schedule = PlateauDoubler(
            levels=self.settings.initial_levels,
            patience=self.settings.patience,
            smoothing=self.settings.ema,
        )
        self.sizes_seen: dict[str, int] = {}
        self.assigned: dict[int, dict[str, int]] = {}

    def begin_round(self, server_round: int, clients: list[ClientProxy]) -> None:
        """Update the time-adaptive q from last round's loss, then give each sampled client its
        level from its data share (clients not seen yet count as the mean size)."""
        if server_round > 1:
            self.schedule.observe(self.progress.last_train_loss)
        known = list(self.sizes_seen.values())
        default = float(np.mean(known)) if known else 1.0
        sizes = np.array([self.sizes_seen.get(c.cid, default) for c in clients], dtype=np.float64)
        levels = client_levels(self.schedule.levels, sizes)
        self.assigned[server_round] = {c.cid: int(q) for c, q in zip(clients, levels, strict=True)}
        self.record_metrics(
            server_round,
            levels=self.schedule.levels,
            client_levels=float(np.mean(levels)) if len(levels) else float("nan"),
        )
        log(
            INFO,
            "[dadaquant] round %d: q = %d, client levels %s",
            server_round,
            self.schedule.levels,
            sorted(self.assigned[server_round].values()),
        )

    def fit_config(self, server_round: int, cid: str) -> dict[str, Scalar]:
        return {DADAQUANT_LEVELS: self.levels_for(server_round, cid)}

    def levels_for(self, server_round: int, cid: str) -> int:
        """The level sent to ``cid`` this round (the time-adaptive q for an unplanned client)."""
        return self.assigned.get(server_round, {}).get(cid, self.schedule.levels)

    def decode_delta(self, server_round: int, reply: ClientReply) -> np.ndarray:
        codec = SymmetricCodec(
            self.sizes, self.levels_for(server_round, reply.cid), self.cfg.entropy
        )
        return dequantize_symmetric(codec.decode(reply.arrays), self.sizes)

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        """Remember the (capped) example counts of the accepted clients for the levels."""
        for update in updates:
            self.sizes_seen[update.cid] = int(update.num_examples)
        return super().aggregate(server_round, updates)

    def method_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The level schedule and the clients' data sizes: what the next round's levels need."""
        schedule = self.schedule
        return {}, {
            "levels": schedule.levels,
            "average": schedule.average,
            "best": schedule.best if np.isfinite(schedule.best) else None,
            "stale": schedule.stale,
            "sizes_seen": self.sizes_seen,
        }

    def load_method_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        levels = int(meta["levels"])
        if not 1 <= levels <= self.schedule.max_levels:
            raise ValueError(f"DAdaQuant levels {levels} outside 1..{self.schedule.max_levels}")
        if int(meta["stale"]) < 0 or any(int(v) < 0 for v in meta["sizes_seen"].values()):
            raise ValueError("DAdaQuant's patience counter and client sizes must be >= 0")
        self.schedule.levels = levels
        self.schedule.average = meta["average"]
        self.schedule.best = float("inf") if meta["best"] is None else float(meta["best"])
        self.schedule.stale = int(meta["stale"])
        self.sizes_seen = {str(k): int(v) for k, v in meta["sizes_seen"].items()}
