"""Framework overhead: a ``flwr run`` simulation round against the clients' own compute.

For each setting, the same run config is executed in one script run:

1. in-process (``tools.inprocess.run_inprocess``: the same ``client_fn``, strategy and Flower
   serialization, no Ray, no SuperLink), with every client's ``fit`` (decode, train, encode) and
   ``client_fn`` (config parsing, data partition, model build) timed separately; run before and
   after the ``flwr run``;
2. with ``flwr run`` on a local Ray simulation through ``tools.launch`` (as ``make run``), whose
   ``rounds.csv`` gives each round's wall time (``seconds``: from ``configure_fit`` to the end of
   the round's central evaluation; the SuperLink it starts is stopped by PID).

Round 1 of a ``flwr run`` pays the Ray actors' start, imports and data loading; it is reported
with the fixed start-up (process and Ray start, round 0 evaluation, shutdown) and kept out of the
steady-state round time: the fastest of rounds 2..R, and likewise in-process, because the box is
shared with other jobs and the least disturbed round is the one that measures the software. The
ratio is that round time over the clients' own compute in a round (the sum of their ``fit``
times in-process, divided by the number of clients Ray runs at once:
``cpus // client-resources-num-cpus``). Torch uses ``--threads`` threads in both, so a client's
compute is the same work in both runs. Because wall times on a shared box move with the other
jobs' load, the CPU seconds of a steady round are reported too: this process's for the
in-process run, and the sum over every process of the ``flwr run`` (SuperLink, simulation, Ray's
raylet/GCS/actors, the ``flwr`` CLI; sampled from ``/proc`` every 0.25 s) for the simulation.
Flower's own in-run measure of the clients' compute is reported as well: the ClientApp seconds
that ``flwr ls`` gives for the run (all rounds together, so round 1's actor start is in it).

Settings: ``cnn4`` on a synthetic CIFAR-10 stand-in (random 32x32 RGB images written as local
parquet files in the ``data-files`` layout, ``--samples`` per client, IID), and the built-in
``digits`` (``digits-cnn-bn``), where a client's compute is a few milliseconds.

    python -m benchmarks.framework_overhead [--settings cnn4 digits] [--clients 10]
        [--samples 300] [--rounds 6] [--cpus-per-client 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import datasets
import numpy as np
import torch
from flwr.client import Client
from flwr.common import Context, FitIns, FitRes
from PIL import Image

import tools.launch as launch_module
from fl_app.client_app import client_fn as app_client_fn
from fl_app.data import DATASETS, clear_caches
from tools.inprocess import run_inprocess
from tools.launch import launch, superlink_pids


def write_cifar_stand_in(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Random images with CIFAR-10's columns and features (``img``: PNG image, ``label``), as
    ``train.parquet``/``test.parquet``: what ``data-files`` reads for the ``cifar10`` dataset."""
    spec = DATASETS.get("cifar10")
    features = datasets.Features(
        {
            spec.image_column: datasets.Image(),
            spec.label_column: datasets.ClassLabel(num_classes=spec.num_classes),
        }
    )
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", n_train), ("test", n_test)):
        pixels = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, spec.num_classes, size=count)
        table = {
            spec.image_column: [Image.fromarray(p) for p in pixels],
            spec.label_column: labels.tolist(),
        }
        datasets.Dataset.from_dict(table, features=features).to_parquet(
            str(root / f"{name}.parquet")
        )


def toml_overrides(config: Mapping[str, Any]) -> str:
    """``--run-config`` text: TOML scalars, strings quoted."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        return f"'{v}'" if isinstance(v, str) else str(v)

    return " ".join(f"{key}={value(v)}" for key, v in config.items())


class Timings:
    """Per round: each client's ``client_fn`` and ``fit`` seconds (in-process run), and the
    process CPU time at the first ``fit`` of each round (round r's CPU runs from there to the
    next round's first ``fit``: its fits, aggregation, evaluation and the next sampling)."""

    def __init__(self) -> None:
        self.build: dict[int, list[float]] = defaultdict(list)
        self.fit: dict[int, list[float]] = defaultdict(list)
        self.cpu_at_round: dict[int, float] = {}

    def client_fn(self, context: Context) -> Client:
        """The app's ``client_fn``, timed, returning a client whose ``fit`` is timed."""
        started = time.perf_counter()
        client = app_client_fn(context)
        build = time.perf_counter() - started
        inner = client.fit

        def timed_fit(ins: FitIns) -> FitRes:
            server_round = int(ins.config["server-round"])
            self.cpu_at_round.setdefault(server_round, time.process_time())
            begun = time.perf_counter()
            res = inner(ins)
            self.fit[server_round].append(time.perf_counter() - begun)
            self.build[server_round].append(build)
            return res

        client.fit = timed_fit  # type: ignore[method-assign]
        return client


def inprocess_profile(config: Mapping[str, Any], clients: int) -> list[dict[str, float]]:
    """Rows per round: round seconds, sum of client fit and client_fn seconds, CPU seconds."""
    clear_caches()
    timings = Timings()
    strategy = run_inprocess(config, clients, client_fn=timings.client_fn)
    timings.cpu_at_round[len(strategy.history)] = time.process_time()  # end of the last round
    return [
        {
            "round": row["round"],
            "round_s": row["seconds"],
            "fit_s": sum(timings.fit[row["round"]]),
            "build_s": sum(timings.build[row["round"]]),
            "cpu_s": timings.cpu_at_round[row["round"] + 1] - timings.cpu_at_round[row["round"]],
        }
        for row in strategy.history
        if row["round"] > 0
    ]


def process_tree_cpu(roots: set[int]) -> float:
    """CPU seconds (user + system) used so far by the live processes ``roots`` and their
    descendants (Linux ``/proc``): the SuperLink, the simulation, Ray's raylet, GCS and actors."""
    ticks = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / ticks
    total = 0.0
    for pid, seconds in cpu.items():
        ancestor, hops = pid, 0
        while ancestor > 1 and ancestor not in roots and hops < 64:
            ancestor, hops = parent.get(ancestor, 1), hops + 1
        if ancestor in roots:
            total += seconds
    return total


class CpuSampler(threading.Thread):
    """Samples ``process_tree_cpu`` of every SuperLink (and the ``flwr`` CLI, a child of this
    process) every ``interval`` seconds while a ``flwr run`` goes on."""

    def __init__(self, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.is_set():
            roots = superlink_pids() | {me}
            own = time.process_time()  # this process's own CPU (the sampler) is not flwr's
            self.samples.append((time.perf_counter(), process_tree_cpu(roots) - own))
            self.stop.wait(self.interval)

    def at(self, when: float) -> float:
        """CPU seconds at time ``when`` (the last sample before it)."""
        before = [cpu for t, cpu in self.samples if t <= when]
        return before[-1] if before else float("nan")


class StampedStdout:
    """Stands in for ``sys.stdout`` while ``launch`` streams the run's log: keeps each line's
    arrival time, so the start-up can be split into its phases (log streaming adds < 1 s)."""

    def __init__(self, target: TextIO) -> None:
        self.target = target
        self.lines: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.lines.append((time.perf_counter(), text))
        return self.target.write(text)

    def flush(self) -> None:
        self.target.flush()

    def first(self, marker: str) -> float:
        """Arrival time of the first line containing ``marker`` (NaN when none does)."""
        return next((t for t, line in self.lines if marker in line), float("nan"))


# Log lines that close each start-up phase, in order.
PHASES = (
    ("SuperLink + run submitted", "Successfully started run"),
    ("simulation + ServerApp start, strategy and test set", "Starting Flower ServerApp"),
    ("round 0 evaluation", "initial parameters (loss"),
    ("rounds", "Run finished"),
)


class ComputeTimeProbe:
    """Wraps ``tools.launch.run_status`` (called once the run has finished, before the SuperLink
    is stopped) to also read Flower's own in-run accounting: ``flwr ls --format json`` reports
    ``compute-time.clientapp-seconds``, the summed time the simulation engine spent executing
    ClientApps (each message's ``client_fn`` + ``fit`` on its Ray actor, with its (de)serialization
    there)."""

    def __init__(self) -> None:
        self.clientapp_seconds = float("nan")
        self.original = launch_module.run_status

    def __enter__(self) -> ComputeTimeProbe:
        launch_module.run_status = self.run_status
        return self

    def __exit__(self, *exc: object) -> None:
        launch_module.run_status = self.original

    def run_status(self, flwr: str, run_id: int, env: dict[str, str]) -> str:
        listing = subprocess.run(
            [flwr, "ls", "--run-id", str(run_id), "--format", "json"],
            cwd=launch_module.PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            for run in json.loads(listing.stdout).get("runs", []):
                if str(run.get("run-id")) == str(run_id):
                    self.clientapp_seconds = float(run["compute-time"]["clientapp-seconds"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass
        return self.original(flwr, run_id, env)


def flwr_profile(
    config: Mapping[str, Any], clients: int, cpus_per_client: int, workdir: Path
) -> dict[str, Any]:
    """One ``flwr run``: wall seconds, start-up phases and the per-round seconds of its
    ``rounds.csv``."""
    federation = f"num-supernodes={clients} client-resources-num-cpus={cpus_per_client}"
    # Every local ``flwr run`` uses the same SuperLink port: one started by someone else on this
    # box would take our run (and stop it with theirs). Wait until none is running.
    deadline = time.monotonic() + 900
    while superlink_pids() and time.monotonic() < deadline:
        time.sleep(5)
    stamped = StampedStdout(sys.stdout)
    sampler = CpuSampler()
    sampler.start()
    started = time.perf_counter()
    sys.stdout = stamped
    probe = ComputeTimeProbe()
    try:
        with probe:
            code, status, results_dir = launch(
                toml_overrides(config),
                clients,
                federation,
                flwr_home=workdir / "flwr-home",
                log_path=workdir / f"{config['run-name']}.log",
            )
    finally:
        sys.stdout = stamped.target
        sampler.stop.set()
    ended = time.perf_counter()
    if code != 0 or results_dir is None:
        raise SystemExit(f"flwr run failed ({status}); log: {workdir / config['run-name']}.log")
    with (results_dir / "rounds.csv").open() as handle:
        rounds = [float(r["seconds"]) for r in csv.DictReader(handle) if int(r["round"]) > 0]
    phases, previous = {}, started
    for name, marker in PHASES:
        now = stamped.first(marker)
        phases[name] = now - previous
        previous = now
    phases["shutdown (status query, SuperLink stop)"] = ended - previous
    # CPU of the steady rounds 2..R: from the arrival of "[ROUND 2]" to that of "Run finished"
    # (both lines reach us through the same log stream, so its delay cancels out).
    steady_cpu = sampler.at(stamped.first("Run finished")) - sampler.at(stamped.first("[ROUND 2]"))
    return {
        "wall_s": ended - started,
        "status": status,
        "round_s": rounds,
        "phases": phases,
        "steady_cpu_per_round_s": steady_cpu / max(1, len(rounds) - 1),
        "clientapp_seconds": probe.clientapp_seconds,
    }


def setting_config(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Run config of a setting (the same for both runs)."""
    config: dict[str, Any] = {
        "strategy": "fedavg",
        "num-server-rounds": args.rounds,
        "local-epochs": args.local_epochs,
        "batch-size": 32,
        "partitioner": "iid",
        "min-available-clients": args.clients,
        "device": "cpu",
        "checkpoint": False,
        "results-dir": str(workdir / "results"),
        "run-name": name,
    }
    if name == "cnn4":
        data = workdir / "cifar-stand-in"
        if not data.exists():
            write_cifar_stand_in(data, args.samples * args.clients, args.test_samples)
        config.update({"dataset": "cifar10", "data-files": str(data), "model": "cnn4"})
    elif name == "digits":
        config.update({"dataset": "digits", "model": "digits-cnn-bn"})
    else:
        raise ValueError(f"unknown setting {name!r}")
    return config


def summarize(
    name: str, inprocs: list[list[dict[str, float]]], flwr: dict[str, Any], lanes: int
) -> dict[str, Any]:
    """Steady-state figures (rounds 2..R: round 1 builds the data caches and Ray's actors) and
    the ratios reported in the README. On a box shared with other jobs a round can take twice as
    long as the next, so, as with best-of-N timings, each side takes its least disturbed round:
    the fastest flwr round, and the fastest in-process round (of the runs before and after the
    flwr run) with that round's own client fit and ``client_fn`` times."""
    best = min((r for runs in inprocs for r in runs[1:]), key=lambda r: r["round_s"])
    fit, build, inproc_round = best["fit_s"], best["build_s"], best["round_s"]
    flwr_round = min(flwr["round_s"][1:])
    compute = fit / lanes
    inproc_cpu = float(np.median([r["cpu_s"] for runs in inprocs for r in runs[1:]]))
    return {
        "setting": name,
        "client_fit_sum_s": fit,
        "client_build_sum_s": build,
        "server_s": inproc_round - fit - build,
        "inprocess_round_s": inproc_round,
        "flwr_round_s": flwr_round,
        "flwr_round1_s": flwr["round_s"][0],
        "flwr_startup_s": flwr["wall_s"] - sum(flwr["round_s"]),
        "flwr_phases_s": flwr["phases"],
        "lanes": lanes,
        "ratio_to_compute": flwr_round / compute,
        "ratio_to_inprocess": flwr_round / (inproc_round - fit + compute),
        "inprocess_cpu_per_round_s": inproc_cpu,
        "flwr_cpu_per_round_s": flwr["steady_cpu_per_round_s"],
        "cpu_ratio": flwr["steady_cpu_per_round_s"] / inproc_cpu,
        "flwr_clientapp_s_all_rounds": flwr["clientapp_seconds"],
        "flwr_round_s_all_rounds": sum(flwr["round_s"]),
        "in_run_ratio": sum(flwr["round_s"]) / flwr["clientapp_seconds"],
        "flwr_rounds_s": flwr["round_s"],
        "inprocess_runs": inprocs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["cnn4", "digits"])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--samples", type=int, default=300, help="cnn4: images per client")
    parser.add_argument("--test-samples", type=int, default=500, help="cnn4: server test set")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--cpus-per-client", type=int, default=2, help="Ray client resources")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the Ray workers
    torch.set_num_threads(args.threads)
    lanes = max(1, (os.cpu_count() or 1) // args.cpus_per_client)
    results = []
    with tempfile.TemporaryDirectory(prefix="framework-overhead-") as tmp:
        workdir = Path(tmp)
        for name in args.settings:
            config = setting_config(name, args, workdir)
            before = inprocess_profile(config, args.clients)
            flwr = flwr_profile(config, args.clients, args.cpus_per_client, workdir)
            after = inprocess_profile(config, args.clients)
            results.append(summarize(name, [before, after], flwr, lanes))
    print(
        f"\n{args.clients} clients, {args.rounds} rounds, {args.local_epochs} local epoch(s), "
        f"{lanes} client(s) at a time (client-resources-num-cpus={args.cpus_per_client} on "
        f"{os.cpu_count()} CPUs), {args.threads} torch thread(s)\n"
    )
    print(
        "| setting | clients' fit / round | flwr round (2..R) | x compute | in-process round "
        "| client_fn / round | server / round | flwr round 1 | fixed start-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['setting']} | {r['client_fit_sum_s'] / r['lanes']:.2f} s | "
            f"{r['flwr_round_s']:.2f} s | {r['ratio_to_compute']:.2f}x | "
            f"{r['inprocess_round_s']:.2f} s | {r['client_build_sum_s']:.2f} s | "
            f"{r['server_s']:.2f} s | {r['flwr_round1_s']:.1f} s | {r['flwr_startup_s']:.1f} s |"
        )
    print("\nCPU seconds per steady round (all processes of the flwr run vs the in-process run):\n")
    print("| setting | in-process CPU / round | flwr CPU / round | ratio |")
    print("|---|---|---|---|")
    for r in results:
        print(
            f"| {r['setting']} | {r['inprocess_cpu_per_round_s']:.2f} s | "
            f"{r['flwr_cpu_per_round_s']:.2f} s | {r['cpu_ratio']:.2f}x |"
        )
    print("\nIn-run, all rounds 1..R: Flower's ClientApp seconds (flwr ls) vs the rounds' wall:\n")
    print("| setting | ClientApp seconds | rounds' seconds | ratio |")
    print("|---|---|---|---|")
    for r in results:
        print(
            f"| {r['setting']} | {r['flwr_clientapp_s_all_rounds']:.1f} s | "
            f"{r['flwr_round_s_all_rounds']:.1f} s | {r['in_run_ratio']:.2f}x |"
        )
    phases = list(results[0]["flwr_phases_s"])
    print("\nflwr run by phase (from the arrival times of its log lines):\n")
    print("| setting | " + " | ".join(phases) + " |")
    print("|---|" + "---|" * len(phases))
    for r in results:
        cells = " | ".join(f"{v:.1f} s" for v in r["flwr_phases_s"].values())
        print(f"| {r['setting']} | {cells} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {**vars(args), "json": str(args.json), "lanes": lanes, "cpus": os.cpu_count()}
        args.json.write_text(json.dumps({"args": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
