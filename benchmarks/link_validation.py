"""The link model against real shaped links: a networked deployment, each SuperNode in its own
network namespace behind a rate-limited link, vs the modelled round times of the same runs.

One deployment (``deploy.local``: TLS, node authentication, SuperLink and SuperNodes as separate
processes in a ``deploy.netns.Lab``) runs every case in turn, the links re-shaped between runs:
first unshaped, then each profile, ``--repeats`` times. Each SuperNode ``i`` sits behind the link
the model gives partition ``i`` (``LocalFederation.shape_links``), and the run is told the same
profile, so its ``rounds.csv`` has, per round, the measured wall seconds (``seconds``: from
sending the round's messages to the end of its evaluation) beside the modelled ones
(``link_seconds``). Rates are shaped by ``tbf``; the RTT by ``netem`` where the kernel has it,
else (this project's machines) by a relay in each node's namespace that holds every chunk RTT / 2
each way (``deploy.relay``).

    sudo .venv/bin/python -m benchmarks.link_validation [--nodes 3] [--rounds 3] [--repeats 1]
        [--profiles iot cellular] [--methods fedavg fedbif] [--json PATH]

Only steady rounds count (2..R; round 1 also carries the app bundle and starts every ClientApp
process). The link alone (``link_seconds``) leaves out what the deployment adds; the unshaped run
just before, in the same deployment, calibrates it (``core.link.Transport``):

- wire factors: bytes the nodes' interfaces carried in the steady rounds (IP and TCP headers,
  TLS, HTTP/2, gRPC and protobuf framing, Flower's other messages) over the app's message bytes
  of those rounds, each way (interface counters read when the round-1 and last rows of
  ``rounds.csv`` appear);
- overhead: the unshaped steady round's wall seconds beyond its slowest client's training
  (Flower's message handling, a ClientApp process per message, the ServerApp's reply polling).

"calibrated" is the model with that transport, recomputed from each shaped run's ``clients.csv``
(the same figures a run given ``link-wire-up``, ``link-wire-down`` and ``link-overhead-s`` would
log); "measured / calibrated" is the check. "measured extra" = shaped minus unshaped measured
seconds per round, against "calibrated transfer" = calibrated minus the unshaped overhead and
training: the transfer part alone.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import write_json
from core.link import (
    PROFILES,
    ClientRound,
    LinkProfile,
    Transport,
    client_link,
    round_time,
)
from core.results import read_rounds
from deploy.local import LocalFederation
from deploy.netns import Lab, shaping_unavailable_reason
from tools.link_report import ClientRecord, read_client_records


@dataclass
class Case:
    profile: str  # "none": unshaped
    method: str
    repeat: int
    measured_s: float  # mean wall seconds per steady round
    modelled_s: float  # mean modelled seconds per steady round, the link alone (NaN unshaped)
    compute_s: float  # mean of the slowest client's training seconds per steady round
    status: str
    #: bytes the nodes' eth0 received / sent in the steady rounds over the app's message bytes
    wire_down: float = float("nan")
    wire_up: float = float("nan")
    #: mean modelled seconds per steady round with the unshaped run's transport (NaN unshaped)
    calibrated_s: float = float("nan")


class RoundCounters:
    """Reads the nodes' interface counters when ``rounds.csv`` gets its round-1 row and its
    round-``rounds`` row: the bytes of the steady rounds, without the app bundle and the
    ClientApp starts of round 1. Polls every 50 ms on a thread (a round takes seconds)."""

    def __init__(self, lab: Lab, nodes: list[str], rounds_csv: Path, rounds: int) -> None:
        self.lab, self.nodes, self.path, self.rounds = lab, nodes, rounds_csv, rounds
        self.marks: dict[int, tuple[int, int]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def totals(self) -> tuple[int, int]:
        pairs = [self.lab.interface_counters(node) for node in self.nodes]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    def _last_round(self) -> int:
        try:
            lines = self.path.read_text().strip().splitlines()
        except OSError:
            return -1
        try:
            return int(float(lines[-1].split(",")[0])) if len(lines) > 1 else -1
        except ValueError:
            return -1

    def _watch(self) -> None:
        while not self.stop.is_set() and len(self.marks) < 2:
            last = self._last_round()
            for mark in (1, self.rounds):
                if last >= mark and mark not in self.marks:
                    self.marks[mark] = self.totals()
            self.stop.wait(0.05)

    def __enter__(self) -> RoundCounters:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def steady(self) -> tuple[int, int] | None:
        """(received, sent) bytes of rounds 2..R, or None when a mark was missed."""
        if 1 not in self.marks or self.rounds not in self.marks:
            return None
        (rx0, tx0), (rx1, tx1) = self.marks[1], self.marks[self.rounds]
        return rx1 - rx0, tx1 - tx0


def steady(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def modelled_round_seconds(
    records: dict[int, list[ClientRecord]],
    rounds: list[int],
    profile: LinkProfile,
    seed: int,
    transport: Transport,
) -> float:
    """Mean modelled seconds of ``rounds`` from the recorded clients, with ``transport``."""
    seconds = []
    for r in rounds:
        clients = [
            ClientRound(
                c.cid,
                c.downlink_bytes,
                c.uplink_bytes,
                c.train_seconds,
                client_link(profile, seed, max(c.partition, 0), transport),
            )
            for c in records[r]
        ]
        seconds.append(round_time(clients).seconds)
    return steady(seconds)


def run_case(
    federation: LocalFederation,
    lab: Lab,
    results: Path,
    method: str,
    profile_name: str,
    profile: LinkProfile | None,
    rounds: int,
    seed: int,
    repeat: int,
    transport: Transport | None,
) -> Case:
    federation.unshape_links()
    name = f"{method}-{profile_name}-{repeat}"
    config = (
        f"strategy='{method}' num-server-rounds={rounds} local-epochs=1 device='cpu' "
        f"min-available-clients={federation.num_nodes} seed={seed} checkpoint=false "
        f"results-dir='{results}' run-name='{name}'"
    )
    if profile is not None:
        federation.shape_links(profile, seed)
        config += (
            f" link-profile='custom' link-up-mbps={profile.up_mbps} "
            f"link-down-mbps={profile.down_mbps} link-rtt-ms={profile.rtt_ms} "
            f"link-spread={profile.spread}"
        )
    nodes = [f"node{i}" for i in range(federation.num_nodes)]
    with RoundCounters(lab, nodes, results / name / "rounds.csv", rounds) as counters:
        outcome = federation.run(config, timeout=1800)
    rows = [r for r in read_rounds(results / name / "rounds.csv") if r["round"] >= 2]
    clients = read_client_records(results / name)
    steady_rounds = [int(r["round"]) for r in rows]
    app_up = sum(c.uplink_bytes for r in steady_rounds for c in clients[r])
    app_down = sum(c.downlink_bytes for r in steady_rounds for c in clients[r])
    wire = counters.steady()
    compute = [max(c.train_seconds for c in clients[r]) for r in steady_rounds]
    rtt = 1.5 * (profile.rtt_ms / 1e3 if profile else 0.0)
    case = Case(
        profile_name,
        method,
        repeat,
        steady([r["seconds"] for r in rows]),
        steady([r["link_seconds"] for r in rows]),
        steady(compute) + rtt,
        outcome.status,
    )
    if wire is not None and app_up and app_down:
        case.wire_down, case.wire_up = wire[0] / app_down, wire[1] / app_up
    if profile is not None and transport is not None:
        case.calibrated_s = modelled_round_seconds(clients, steady_rounds, profile, seed, transport)
    return case


def calibration(unshaped: Case) -> Transport:
    """The transport the unshaped run measured (module docstring)."""
    return Transport(
        wire_up=max(unshaped.wire_up, 1.0) if np.isfinite(unshaped.wire_up) else 1.0,
        wire_down=max(unshaped.wire_down, 1.0) if np.isfinite(unshaped.wire_down) else 1.0,
        overhead_s=max(unshaped.measured_s - unshaped.compute_s, 0.0),
    )


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"


def print_table(cases: list[Case]) -> None:
    print(
        "| profile | method | runs | measured s/round | link alone s/round | calibrated s/round "
        "| measured / calibrated | measured / (link alone + overhead) "
        "| measured extra over unshaped | calibrated transfer "
        "| wire/app bytes up, down (unshaped) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    methods = list(dict.fromkeys(c.method for c in cases))
    profiles = list(dict.fromkeys(c.profile for c in cases))
    for method in methods:
        base = {c.repeat: c for c in cases if c.method == method and c.profile == "none"}
        for profile in profiles:
            mine = [c for c in cases if c.method == method and c.profile == profile]
            if not mine:
                continue
            measured = [c.measured_s for c in mine]
            if profile == "none":
                wire = ", ".join(
                    mean_std([getattr(c, f"wire_{d}") for c in mine]) for d in ("up", "down")
                )
                print(
                    f"| unshaped | {method} | {len(mine)} | {mean_std(measured)} | - | - | - "
                    f"| - | - | - | {wire} |"
                )
                continue
            ratio = [c.measured_s / c.calibrated_s for c in mine]
            alone = [
                c.measured_s / (c.modelled_s + calibration(base[c.repeat]).overhead_s) for c in mine
            ]
            extra = [c.measured_s - base[c.repeat].measured_s for c in mine]
            transfer = [
                c.calibrated_s - calibration(base[c.repeat]).overhead_s - c.compute_s for c in mine
            ]
            print(
                f"| {profile} | {method} | {len(mine)} | {mean_std(measured)} "
                f"| {mean_std([c.modelled_s for c in mine])} "
                f"| {mean_std([c.calibrated_s for c in mine])} | {mean_std(ratio)} "
                f"| {mean_std(alone)} "
                f"| {mean_std(extra)} | {mean_std(transfer)} | - |"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--profiles", nargs="+", default=["iot", "cellular"], choices=PROFILES)
    parser.add_argument("--methods", nargs="+", default=["fedavg", "fedbif"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is not a steady round)")
    if reason := shaping_unavailable_reason():
        print(f"cannot shape links here: {reason}")
        return 1
    # RTT: netem where the kernel has it, else each node's delaying relay (deploy.relay).
    netem = shaping_unavailable_reason(delay=True) is None
    workdir = Path(tempfile.mkdtemp(prefix="link-validation-"))
    results = workdir / "results"
    cases: list[Case] = []
    lab = Lab(LocalFederation.lab_hosts(args.nodes))
    lab.create()
    try:
        with LocalFederation(workdir, args.nodes, lab=lab) as federation:
            federation.start_superlink()
            federation.register_nodes()
            federation.start_supernodes()
            for repeat in range(args.repeats):
                for method in args.methods:
                    unshaped = run_case(
                        federation, lab, results, method, "none", None, args.rounds,
                        args.seed, repeat, None,
                    )  # fmt: skip
                    cases.append(unshaped)
                    print(f"[link-validation] {unshaped}", flush=True)
                    transport = calibration(unshaped)
                    for name in args.profiles:
                        case = run_case(
                            federation, lab, results, method, name, PROFILES[name],
                            args.rounds, args.seed, repeat, transport,
                        )  # fmt: skip
                        cases.append(case)
                        print(f"[link-validation] {case}", flush=True)
    finally:
        lab.destroy()
    print(
        f"\n{args.nodes} SuperNodes in network namespaces, {args.rounds} rounds "
        f"(steady: 2..{args.rounds}), {args.repeats} repeat(s), digits; RTT "
        f"{'by netem' if netem else 'by a delaying TCP relay per node (no netem here)'}\n"
    )
    if args.json:
        write_json(args.json, [asdict(c) for c in cases])
    print_table(cases)
    return 0 if all(c.status == "finished:completed" for c in cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
