"""Traffic accounting: bytes and messages per round and direction, as serialized on the wire.

Everything that travels is measured from the serialized ``Parameters.tensors`` Flower puts on the
wire (``.npy`` bytes, headers included), never from a nominal bit-width:

    bpp (per direction) = 8 * bytes / num_scalars / messages

where ``num_scalars`` is the number of scalars in a plain FedAvg message of the model (its wire
state, ``core.wire_state``) and ``messages`` the number of client messages in that direction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from flwr.common import Parameters


@dataclass
class RoundTraffic:
    """Bytes and messages of one round, per direction, as serialized on the wire."""

    uplink_bytes: int = 0
    downlink_bytes: int = 0
    uplink_messages: int = 0
    downlink_messages: int = 0
    failures: int = 0
    rejected: int = 0
    #: client updates whose norm was bounded, and whether the aggregate was refused.
    clipped: int = 0
    aggregate_refused: int = 0
    #: 1 when the robust rule (trimmed-mean, median) could not do what it says with the
    #: round's number of updates (``strategies.aggregation.robust_shortfall``).
    aggregation_degraded: int = 0
    #: the round's length on the run's modelled links (``core.link``), and the clients its
    #: deadline dropped; 0 without a link profile.
    link_seconds: float = 0.0
    late: int = 0

    def add(self, other: RoundTraffic) -> None:
        for name in (f.name for f in dataclasses.fields(self)):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class TrafficLedger(dict[int, RoundTraffic]):
    """``RoundTraffic`` per round number."""

    def round(self, server_round: int) -> RoundTraffic:
        """The round's record, created empty on first use."""
        return self.setdefault(server_round, RoundTraffic())

    def totals(self) -> RoundTraffic:
        total = RoundTraffic()
        for traffic in self.values():
            total.add(traffic)
        return total

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {str(r): vars(t) for r, t in self.items()}

    @classmethod
    def from_json(cls, data: dict[str, dict[str, Any]]) -> TrafficLedger:
        """The ledger a checkpoint holds; a counter it lacks (an older checkpoint) is 0 and a
        name it does not know is refused."""
        known = {f.name for f in dataclasses.fields(RoundTraffic)}
        ledger = cls()
        for r, t in data.items():
            unknown = set(t) - known
            if unknown:
                raise ValueError(f"traffic of round {r} has unknown fields {sorted(unknown)}")
            ledger[int(r)] = RoundTraffic(**t)
        return ledger


def parameters_nbytes(parameters: Parameters) -> int:
    """Bytes of a ``Parameters`` payload: the serialized tensors Flower transmits."""
    return sum(len(tensor) for tensor in parameters.tensors)


def bits_per_parameter(nbytes: int, num_scalars: int, messages: int) -> float:
    """The one definition of bpp used everywhere (0 when nothing was sent)."""
    if messages == 0 or num_scalars == 0:
        return 0.0
    return 8.0 * nbytes / num_scalars / messages
