"""The server's view of each client's round: bytes each way, training seconds, modelled time.

``RoundClients`` collects, for one round, what the server sent each client and what came back
(bytes as serialized, the client's reported training seconds), and applies the run's link model
(``core.link``) to it: the round's modelled length, and which replies a modelled deadline drops.
Its rows are the run's ``clients.csv`` (one row per client and round), from which any other
link profile can be modelled after the run (``tools.link_table``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from flwr.common import FitRes

from contracts.messages import PARTITION_ID, TRAIN_SECONDS
from core.config import RunConfig
from core.link import (
    ClientLink,
    ClientRound,
    LinkProfile,
    Transport,
    client_link,
    resolve_profile,
    round_time,
)
from strategies.accounting import parameters_nbytes

#: ``clients.csv`` columns (user-facing: add, never rename). ``status``: accepted, rejected
#: (the trust boundary refused the message), late (after the modelled deadline).
CLIENT_COLUMNS: tuple[str, ...] = (
    "round",
    "cid",
    "partition",
    "downlink_bytes",
    "uplink_bytes",
    "train_seconds",
    "link_seconds",
    "status",
)


def profile_of(cfg: RunConfig) -> LinkProfile | None:
    """The run's link profile (``None``: no link model)."""
    return resolve_profile(
        cfg.link_profile, cfg.link_up_mbps, cfg.link_down_mbps, cfg.link_rtt_ms, cfg.link_spread
    )


def transport_of(cfg: RunConfig) -> Transport:
    """The deployment overheads the run's link model adds (``link-wire-*``, ``link-overhead-s``)."""
    return Transport(cfg.link_wire_up, cfg.link_wire_down, cfg.link_overhead_s)


def reported_partition(res: FitRes) -> int:
    """The partition a reply claims, or -1 (the trust boundary rejects such a reply later)."""
    value = res.metrics.get(PARTITION_ID)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else -1


def reported_seconds(res: FitRes) -> float:
    """The training seconds a reply reports; 0 when missing or not a finite number >= 0 (such a
    reply is rejected later; its transfer still took time)."""
    value = res.metrics.get(TRAIN_SECONDS)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok and value >= 0 else 0.0


@dataclass
class RoundClients:
    """One round's clients as the server saw them (module docstring)."""

    server_round: int
    profile: LinkProfile | None
    seed: int
    deadline: float
    transport: Transport = field(default_factory=Transport)
    sent: dict[str, int] = field(default_factory=dict)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)

    def link(self, partition: int) -> ClientLink | None:
        if self.profile is None:
            return None
        return client_link(self.profile, self.seed, max(partition, 0), self.transport)

    def receive(self, replies: list[tuple[str, FitRes]]) -> tuple[float, set[str]]:
        """Record the replies; returns the round's modelled seconds (NaN without a profile) and
        the cids the modelled deadline drops."""
        rounds: list[ClientRound] = []
        for cid, res in replies:
            partition = reported_partition(res)
            row = {
                "round": self.server_round,
                "cid": cid,
                "partition": partition,
                "downlink_bytes": self.sent.get(cid, 0),
                "uplink_bytes": parameters_nbytes(res.parameters),
                "train_seconds": reported_seconds(res),
                "link_seconds": math.nan,
                "status": "accepted",
            }
            self.rows[cid] = row
            link = self.link(partition)
            if link is not None:
                client = ClientRound(
                    cid, row["downlink_bytes"], row["uplink_bytes"], row["train_seconds"], link
                )
                row["link_seconds"] = client.seconds
                rounds.append(client)
        if self.profile is None:
            return math.nan, set()
        timing = round_time(rounds, self.deadline)
        for cid in timing.late:
            self.rows[cid]["status"] = "late"
        return timing.seconds, set(timing.late)

    def mark(self, cid: str, status: str) -> None:
        if cid in self.rows:
            self.rows[cid]["status"] = status

    def table(self) -> list[dict[str, Any]]:
        """``clients.csv`` rows of the round, by cid."""
        return [self.rows[cid] for cid in sorted(self.rows, key=_cid_key)]


def _cid_key(cid: str) -> tuple[int, str]:
    return (int(cid), cid) if cid.isdigit() else (0, cid)
