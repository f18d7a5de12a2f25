"""Results of a run as the strategies record them: round rows, the summary, the log line.

``RunProgress`` is everything a run has done so far (recorded rounds, traffic, clients seen,
the rounds a resumed run already had); ``round_row``, ``summary`` and ``log_round`` turn it
into the ``rounds.csv`` rows, the ``summary.json`` content and the one console line per round.
Column and field names are the user-facing interface (``core.results``): add, never rename.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO
from typing import Any

from flwr.common.logger import log

from core.config import RunConfig
from strategies.accounting import RoundTraffic, TrafficLedger, bits_per_parameter

MB = 1024 * 1024
#: validation columns, NaN in a run without a validation split (and in rows of checkpoints
#: written before the columns existed).
VALIDATION_COLUMNS = ("val_accuracy", "val_loss")
#: link-model columns of rows recorded before they existed.
LINK_DEFAULTS: dict[str, float | int] = {
    "link_seconds": math.nan,
    "link_seconds_total": math.nan,
    "late": 0,
}


@dataclass
class RunProgress:
    """The rounds recorded so far and what they cost; a checkpoint saves and restores it."""

    history: list[dict[str, Any]] = field(default_factory=list)
    traffic: TrafficLedger = field(default_factory=TrafficLedger)
    num_clients: int = 0
    #: rounds completed before this process started (resume); Flower counts from 1 again.
    round_offset: int = 0
    last_train_loss: float = float("nan")
    started: float = field(default_factory=time.perf_counter)

    def recorded(self, server_round: int) -> bool:
        return any(row["round"] == server_round for row in self.history)

    def wall_seconds(self) -> float:
        return time.perf_counter() - self.started

    def to_meta(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "traffic": self.traffic.to_json(),
            "num_clients": self.num_clients,
            "wall_seconds": self.wall_seconds(),
            "last_train_loss": self.last_train_loss,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], completed_round: int) -> RunProgress:
        missing = {**dict.fromkeys(VALIDATION_COLUMNS, math.nan), **LINK_DEFAULTS}
        if not all(isinstance(row, Mapping) and "round" in row for row in meta["history"]):
            raise ValueError("a recorded round is not a row of rounds.csv")
        return cls(
            history=[{**missing, **row} for row in meta["history"]],
            traffic=TrafficLedger.from_json(meta["traffic"]),
            num_clients=int(meta["num_clients"]),
            round_offset=completed_round,
            last_train_loss=float(meta.get("last_train_loss", float("nan"))),
            started=time.perf_counter() - float(meta["wall_seconds"]),
        )


def round_row(
    server_round: int,
    loss: float,
    accuracy: float,
    traffic: RoundTraffic,
    num_scalars: int,
    train_loss: float,
    seconds: float,
    method_columns: Mapping[str, Any],
    *,
    val_accuracy: float = math.nan,
    val_loss: float = math.nan,
    link_seconds_total: float = math.nan,
) -> dict[str, Any]:
    """The ``rounds.csv`` row of a round (round 0 = the initial model, no traffic).

    ``link_seconds``/``link_seconds_total``: the round's and the run's modelled seconds on the
    run's links (``core.link``); NaN without a link profile (``link_seconds_total`` is NaN then).

    ``total_bpp`` is what one participating client moves per parameter in the round, both ways
    (uplink bpp + downlink bpp): the figure a method's users pay for, not one direction of it."""
    uplink_bpp = bits_per_parameter(traffic.uplink_bytes, num_scalars, traffic.uplink_messages)
    downlink_bpp = bits_per_parameter(
        traffic.downlink_bytes, num_scalars, traffic.downlink_messages
    )
    return {
        "round": server_round,
        "accuracy": accuracy,
        "loss": loss,
        "train_loss": train_loss if server_round > 0 else float("nan"),
        "uplink_bytes": traffic.uplink_bytes,
        "downlink_bytes": traffic.downlink_bytes,
        "uplink_bpp": uplink_bpp,
        "downlink_bpp": downlink_bpp,
        "clients": traffic.uplink_messages - traffic.rejected - traffic.late,
        "failures": traffic.failures,
        "rejected": traffic.rejected,
        "seconds": seconds if server_round > 0 else 0.0,
        "clipped": traffic.clipped,
        "aggregate_refused": traffic.aggregate_refused,
        "aggregation_degraded": traffic.aggregation_degraded,
        "total_bytes": traffic.uplink_bytes + traffic.downlink_bytes,
        "total_bpp": uplink_bpp + downlink_bpp,
        "val_accuracy": val_accuracy,
        "val_loss": val_loss,
        "link_seconds": traffic.link_seconds if math.isfinite(link_seconds_total) else math.nan,
        "link_seconds_total": link_seconds_total,
        "late": traffic.late,
        **method_columns,
    }


def summary(
    cfg: RunConfig,
    progress: RunProgress,
    num_scalars: int,
    device: str,
    server_threads: int,
    client_threads: Iterable[int] = (),
) -> dict[str, Any]:
    """The ``summary.json`` content for the rounds recorded so far. A CPU run's exact numbers
    depend on its thread counts: ``torch_threads`` is the clients' (as they reported it; the
    largest where they differ, all of them in ``client_torch_threads``; the configured value
    before any client answered), ``server_torch_threads`` the server's."""
    seen = sorted(set(client_threads))
    totals = progress.traffic.totals()
    history = progress.history
    last = history[-1] if history else {}
    best = max(history, key=lambda row: row["accuracy"]) if history else {}
    validation = [
        float(row["val_accuracy"])
        for row in history
        if math.isfinite(float(row.get("val_accuracy", math.nan)))
    ]
    rounds_done = int(last.get("round", 0))
    return {
        "strategy": cfg.strategy,
        "dataset": cfg.dataset,
        "model": cfg.model,
        "partitioner": cfg.partitioner,
        "num_clients": progress.num_clients,
        "num_rounds": cfg.num_server_rounds,
        "rounds_completed": rounds_done,
        "completed": rounds_done >= cfg.num_server_rounds,
        "num_params": num_scalars,
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("loss"),
        "best_accuracy": best.get("accuracy"),
        "best_round": best.get("round"),
        # on the validation split (tools.experiment's [tune] chooses by these); null when off.
        "final_val_accuracy": last.get("val_accuracy", math.nan),
        "best_val_accuracy": max(validation) if validation else math.nan,
        "uplink_bytes": totals.uplink_bytes,
        "downlink_bytes": totals.downlink_bytes,
        "uplink_messages": totals.uplink_messages,
        "downlink_messages": totals.downlink_messages,
        "uplink_bpp": bits_per_parameter(totals.uplink_bytes, num_scalars, totals.uplink_messages),
        "downlink_bpp": bits_per_parameter(
            totals.downlink_bytes, num_scalars, totals.downlink_messages
        ),
        "total_bytes": totals.uplink_bytes + totals.downlink_bytes,
        "total_bpp": bits_per_parameter(totals.uplink_bytes, num_scalars, totals.uplink_messages)
        + bits_per_parameter(totals.downlink_bytes, num_scalars, totals.downlink_messages),
        "failures": totals.failures,
        "rejected": totals.rejected,
        "clipped": totals.clipped,
        "aggregates_refused": totals.aggregate_refused,
        # rounds where trimmed-mean or median could not trim with the updates it had
        "aggregation_degraded_rounds": totals.aggregation_degraded,
        "late": totals.late,
        **target_fields(cfg, history),
        "wall_seconds": progress.wall_seconds(),
        "device": device,
        "torch_threads": seen[-1] if seen else cfg.torch_threads,
        "client_torch_threads": seen,
        "server_torch_threads": server_threads,
        "config": cfg.as_dict(),
    }


def log_round(strategy: str, num_rounds: int, row: Mapping[str, Any]) -> None:
    """The one console line per round: accuracy, loss, measured MB and bpp each way and total."""
    log(
        INFO,
        "[%s] round %d/%d | acc %.4f | loss %.4f | up %.3f MB | down %.3f MB | "
        "bpp up %.3f | bpp down %.3f | bpp total %.3f | clients %d | %.1f s",
        strategy,
        row["round"],
        num_rounds,
        row["accuracy"],
        row["loss"],
        row["uplink_bytes"] / MB,
        row["downlink_bytes"] / MB,
        row["uplink_bpp"],
        row["downlink_bpp"],
        row["total_bpp"],
        row["clients"],
        row["seconds"],
    )
    if math.isfinite(float(row.get("link_seconds", math.nan))) and row["round"] > 0:
        log(
            INFO,
            "[%s] round %d: %.1f s on the modelled links (%.1f s in all)%s",
            strategy,
            row["round"],
            row["link_seconds"],
            row["link_seconds_total"],
            f", {row['late']} late" if row.get("late") else "",
        )


def target_fields(cfg: RunConfig, history: list[dict[str, Any]]) -> dict[str, Any]:
    """The link model's totals and what reaching ``target-accuracy`` cost: the first round at
    or above it, the bytes moved and the modelled seconds until then (null when not reached,
    without a target, or, for the seconds, without a link profile)."""
    linked = cfg.link_profile != "none"
    last = history[-1] if history else {}
    reached = next(
        (
            row
            for row in history
            if cfg.target_accuracy > 0 and float(row["accuracy"]) >= cfg.target_accuracy
        ),
        None,
    )
    total_bytes = 0
    for row in history:
        total_bytes += int(row["total_bytes"])
        if row is reached:
            break
    return {
        "link_profile": cfg.link_profile,
        "link_seconds_total": last.get("link_seconds_total", math.nan) if linked else None,
        "target_accuracy": cfg.target_accuracy if cfg.target_accuracy > 0 else None,
        "round_to_target": reached["round"] if reached else None,
        "total_bytes_to_target": total_bytes if reached else None,
        "link_seconds_to_target": reached["link_seconds_total"] if reached and linked else None,
    }
