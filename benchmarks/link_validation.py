"""The link model against real shaped links: a networked deployment, each SuperNode in its own
network namespace behind a rate-limited link, vs the modelled round times of the same runs.

One deployment (``deploy.local``: TLS, node authentication, SuperLink and SuperNodes as separate
processes in a ``deploy.netns.Lab``) runs every case in turn, the links re-shaped between runs:
first unshaped, then each profile. Each SuperNode ``i`` sits behind the link the model gives
partition ``i`` (``LocalFederation.shape_links``), and the run is told the same profile, so its
``rounds.csv`` has, per round, the measured wall seconds (``seconds``: from sending the round's
messages to the end of its evaluation) beside the modelled ones (``link_seconds``). Rates are
shaped by ``tbf``; the RTT by ``netem`` where the kernel has it, else (this project's machines)
by a relay in each node's namespace that holds every chunk RTT / 2 each way (``deploy.relay``).

    sudo .venv/bin/python -m benchmarks.link_validation [--nodes 3] [--rounds 3]
        [--profiles iot cellular] [--methods fedavg fedbif] [--json PATH]

Rows: steady rounds (2..R; round 1 also carries the app bundle and starts every ClientApp
process). "+ unshaped overhead" adds to the model what the deployment itself costs per round
(the unshaped run's seconds beyond its clients' compute: Flower's message handling, a ClientApp
process per message, the ServerApp's 3 s reply collection), which the link model leaves out;
"measured extra" = shaped minus unshaped measured seconds per round; "modelled transfer" =
modelled minus the modelled round without transfer (1.5 RTT + the slowest client's training
seconds); wire/app = bytes the nodes' interfaces carried in the whole run (IP and TCP headers,
TLS, gRPC and protobuf framing, Flower's other messages, the app bundle) over the app's
message bytes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core.link import PROFILES, LinkProfile
from core.results import read_rounds
from deploy.local import LocalFederation
from deploy.netns import Lab, shaping_unavailable_reason
from tools.link_report import read_client_records


@dataclass
class Case:
    profile: str  # "none": unshaped
    method: str
    measured_s: float  # mean wall seconds per steady round
    modelled_s: float  # mean modelled seconds per steady round (NaN unshaped)
    compute_s: float  # mean of the slowest client's training seconds per steady round
    status: str
    #: bytes the nodes' eth0 sent / received in the whole run over the app's message bytes
    wire_up_ratio: float = float("nan")
    wire_down_ratio: float = float("nan")


def steady(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def run_case(
    federation: LocalFederation,
    lab: Lab,
    results: Path,
    method: str,
    profile_name: str,
    profile: LinkProfile | None,
    rounds: int,
    seed: int,
) -> Case:
    federation.unshape_links()
    name = f"{method}-{profile_name}"
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
    before = [lab.interface_counters(node) for node in nodes]
    outcome = federation.run(config, timeout=1800)
    after = [lab.interface_counters(node) for node in nodes]
    wire_down = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    wire_up = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    rows = [r for r in read_rounds(results / name / "rounds.csv") if r["round"] >= 2]
    clients = read_client_records(results / name)
    app_up = sum(c.uplink_bytes for records in clients.values() for c in records)
    app_down = sum(c.downlink_bytes for records in clients.values() for c in records)
    compute = [max(c.train_seconds for c in clients[int(r["round"])]) for r in rows]
    rtt = 1.5 * (profile.rtt_ms / 1e3 if profile else 0.0)
    return Case(
        profile_name,
        method,
        steady([r["seconds"] for r in rows]),
        steady([r["link_seconds"] for r in rows]),
        steady(compute) + rtt,
        outcome.status,
        wire_up / app_up,
        wire_down / app_down,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profiles", nargs="+", default=["iot", "cellular"], choices=PROFILES)
    parser.add_argument("--methods", nargs="+", default=["fedavg", "fedbif"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if reason := shaping_unavailable_reason():
        print(f"cannot shape links here: {reason}")
        return 1
    # RTT: netem where the kernel has it, else each node's delaying relay (deploy.relay).
    netem = shaping_unavailable_reason(delay=True) is None
    rtt = True
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
            for method in args.methods:
                plans: list[tuple[str, LinkProfile | None]] = [("none", None)]
                for name in args.profiles:
                    named = PROFILES[name]
                    plans.append(
                        (
                            name,
                            LinkProfile(
                                named.up_mbps,
                                named.down_mbps,
                                named.rtt_ms if rtt else 0.0,
                                named.spread,
                            ),
                        )
                    )
                for name, profile in plans:
                    case = run_case(
                        federation, lab, results, method, name, profile, args.rounds, args.seed
                    )
                    cases.append(case)
                    print(f"[link-validation] {case}", flush=True)
    finally:
        lab.destroy()
    print(
        f"\n{args.nodes} SuperNodes in network namespaces, {args.rounds} rounds, digits; RTT "
        f"{'by netem' if netem else 'by a delaying TCP relay per node (no netem here)'}\n"
    )
    print(
        "| profile | method | measured s/round | modelled s/round | + unshaped overhead "
        "| measured / (modelled + overhead) | measured extra over unshaped | modelled transfer "
        "| wire/app bytes up, down |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base = {c.method: c for c in cases if c.profile == "none"}
    for case in cases:
        wire = f"{case.wire_up_ratio:.3f}, {case.wire_down_ratio:.3f}"
        if case.profile == "none":
            print(
                f"| unshaped | {case.method} | {case.measured_s:.2f} | - | - | - | - | - | {wire} |"
            )
            continue
        # the deployment's own per-round cost: unshaped wall time beyond its clients' compute
        overhead = base[case.method].measured_s - base[case.method].compute_s
        extra = case.measured_s - base[case.method].measured_s
        transfer = case.modelled_s - case.compute_s
        ratio = case.measured_s / (case.modelled_s + overhead)
        print(
            f"| {case.profile} | {case.method} | {case.measured_s:.2f} | {case.modelled_s:.2f} "
            f"| {case.modelled_s + overhead:.2f} | {ratio:.2f} | {extra:.2f} | {transfer:.2f} "
            f"| {wire} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(c) for c in cases], indent=2) + "\n")
    return 0 if all(c.status == "finished:completed" for c in cases) else 1


if __name__ == "__main__":
    raise SystemExit(main())
