"""A link model: how long a round takes when clients sit behind slow, asymmetric links.

Bits per parameter answer "which method is cheapest" only when compute is free. This module turns
what a round measured (each client's bytes down and up, and its own training seconds) into a
modelled wall-clock time on named link profiles, so that methods can be compared by time to a
target accuracy. Pure functions, no Flower import: the strategies apply it per round, the
experiment harness re-applies it to recorded rounds (``clients.csv``) for other profiles.

One client's round on its link (rates in Mbit/s = 10^6 bit/s, bytes as serialized):

    t = 1.5 RTT + 8 down_bytes / down_rate + compute + 8 up_bytes / up_rate

A SuperNode pulls its message (a request and the reply: one RTT before the first byte), trains,
and pushes its reply (half an RTT until the server has it). By default the bytes are the app's
message bytes and nothing else costs time: the link alone. A real deployment also sends IP, TCP,
TLS, HTTP/2, gRPC and protobuf framing and Flower's own messages, and spends time on message
handling; a ``Transport`` calibrated on that deployment's unshaped run (wire bytes per app byte
each way, seconds per client round beyond training) carries them into the model:

    t = 1.5 RTT + wire_down 8 down_bytes / down_rate + compute + wire_up 8 up_bytes / up_rate
        + overhead

(``benchmarks.link_validation`` measures both and checks the result against shaped links).

The round ends when the last client is back; with a deadline (``round-timeout``) it ends at the
deadline when a client is later, and the late clients are dropped, as a real server that closes
the round would.

Per-client spread: each client's rates are the profile's times one log-normal factor
``exp(sigma * z)`` (z standard normal, seeded by the run seed and the client's partition, the
same factor both ways and in every round: a slow client stays slow), so stragglers exist.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from core.seeding import numpy_rng

#: seed salt of the per-client rate factors (``core.seeding``).
LINK_SALT = 0x11AC
#: RTTs per client round: the pull (request and reply) and half of the push.
RTTS_PER_ROUND = 1.5


def _check_fields(obj: object, positive: tuple[str, ...], non_negative: tuple[str, ...]) -> None:
    """Refuse non-finite figures, and ones <= 0 (``positive``) or < 0 (``non_negative``)."""
    for names, ok, bound in ((positive, float.__gt__, "> 0"), (non_negative, float.__ge__, ">= 0")):
        for name in names:
            value = float(getattr(obj, name))
            if not (math.isfinite(value) and ok(value, 0.0)):
                raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


@dataclass(frozen=True)
class LinkProfile:
    """Median link of a client population: rates in Mbit/s, RTT in ms, log-normal spread."""

    up_mbps: float
    down_mbps: float
    rtt_ms: float
    spread: float = 0.0

    def __post_init__(self) -> None:
        _check_fields(self, positive=("up_mbps", "down_mbps"), non_negative=("rtt_ms", "spread"))


#: Named profiles (README, "Link model", gives the sources): ``iot`` an LTE-M class device
#: (Cat-M1 peaks at 1 Mbit/s; uplinks are slower in practice), ``cellular`` a loaded or rural
#: 4G cell (well below the global mobile medians of ~55 down / ~12 up Mbit/s in Ookla's
#: Speedtest Global Index, 2021), ``broadband`` a fixed line near the global fixed median down
#: (~107 Mbit/s) with the slower uplink of DSL/cable.
PROFILES: Mapping[str, LinkProfile] = {
    "iot": LinkProfile(up_mbps=0.25, down_mbps=1.0, rtt_ms=100.0, spread=0.5),
    "cellular": LinkProfile(up_mbps=5.0, down_mbps=20.0, rtt_ms=50.0, spread=0.5),
    "broadband": LinkProfile(up_mbps=20.0, down_mbps=100.0, rtt_ms=20.0, spread=0.3),
}
PROFILE_CHOICES: tuple[str, ...] = ("none", *PROFILES, "custom")


@dataclass(frozen=True)
class Transport:
    """What a deployment adds to the app's bytes and the clients' training (module docstring):
    wire bytes per app byte each way, and seconds per client round. The default adds nothing."""

    wire_up: float = 1.0
    wire_down: float = 1.0
    overhead_s: float = 0.0

    def __post_init__(self) -> None:
        _check_fields(self, positive=("wire_up", "wire_down"), non_negative=("overhead_s",))


#: the link alone: app bytes, no deployment overhead.
NO_TRANSPORT = Transport()


@dataclass(frozen=True)
class ClientLink:
    """One client's link: its rates (Mbit/s) and RTT (s), and the deployment's ``Transport``."""

    up_mbps: float
    down_mbps: float
    rtt_s: float
    transport: Transport = NO_TRANSPORT


@dataclass(frozen=True)
class ClientRound:
    """What one client did in a round, as the server measured it."""

    client: str
    down_bytes: int
    up_bytes: int
    compute_seconds: float
    link: ClientLink

    @property
    def seconds(self) -> float:
        """When this client's reply is at the server, from the round's start."""
        return client_round_seconds(self.down_bytes, self.up_bytes, self.compute_seconds, self.link)


@dataclass(frozen=True)
class RoundTime:
    """A round's modelled length and the clients the deadline dropped."""

    seconds: float
    late: tuple[str, ...]


def transfer_seconds(nbytes: int, mbps: float) -> float:
    """Seconds to send ``nbytes`` at ``mbps`` Mbit/s."""
    return 8.0 * nbytes / (mbps * 1e6)


def client_round_seconds(
    down_bytes: int, up_bytes: int, compute_seconds: float, link: ClientLink
) -> float:
    """Module docstring's ``t``: pull, train, push on ``link``."""
    transport = link.transport
    return (
        RTTS_PER_ROUND * link.rtt_s
        + transport.wire_down * transfer_seconds(down_bytes, link.down_mbps)
        + compute_seconds
        + transport.wire_up * transfer_seconds(up_bytes, link.up_mbps)
        + transport.overhead_s
    )


def client_link(
    profile: LinkProfile, seed: int, partition: int, transport: Transport = NO_TRANSPORT
) -> ClientLink:
    """The link of the client holding ``partition``: the profile's rates times its seeded
    log-normal factor (module docstring), in a deployment that adds ``transport``."""
    factor = 1.0
    if profile.spread > 0:
        z = float(numpy_rng(seed, partition, LINK_SALT).standard_normal())
        factor = math.exp(profile.spread * z)
    return ClientLink(
        profile.up_mbps * factor, profile.down_mbps * factor, profile.rtt_ms / 1e3, transport
    )


def round_time(clients: Iterable[ClientRound], deadline: float = 0.0) -> RoundTime:
    """The round's length: the last client's arrival, or ``deadline`` (seconds, 0 = none) when
    a client arrives after it; those clients are ``late``. A round without clients takes 0 s
    (nothing was sent)."""
    arrivals = {c.client: c.seconds for c in clients}
    if not arrivals:
        return RoundTime(0.0, ())
    late = tuple(sorted(c for c, t in arrivals.items() if deadline > 0 and t > deadline))
    if late:
        return RoundTime(deadline, late)
    return RoundTime(max(arrivals.values()), ())


def resolve_profile(
    name: str, up_mbps: float, down_mbps: float, rtt_ms: float, spread: float
) -> LinkProfile | None:
    """The profile a run config names (``None`` for ``none``; ``custom`` takes the figures)."""
    if name == "none":
        return None
    if name == "custom":
        return LinkProfile(up_mbps, down_mbps, rtt_ms, spread)
    if name not in PROFILES:
        raise ValueError(f"unknown link profile {name!r}; valid: {', '.join(PROFILE_CHOICES)}")
    return PROFILES[name]


def seconds_to_target(
    accuracies: Iterable[float], cumulative_seconds: Iterable[float], target: float
) -> float | None:
    """Cumulative modelled seconds at the first round whose accuracy reaches ``target``
    (``None`` if none does, or without a target)."""
    if not target > 0:
        return None
    for accuracy, seconds in zip(accuracies, cumulative_seconds, strict=True):
        if accuracy >= target:
            return seconds
    return None
