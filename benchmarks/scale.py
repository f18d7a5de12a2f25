"""Memory and round time with many virtual clients, for the methods that keep per-client state.

Each (method, number of clients) runs in its own Python process (so its peak RSS is its own)
through the in-process runner ``tools.inprocess.run_inprocess``, which, like Flower's
simulation, keeps every node's ``Context`` (and so its ``context.state``) in one process for the
whole run. ``fraction-fit`` of the clients (default 10%) train each round on a tiny synthetic
CIFAR-10 stand-in (``--samples`` 32x32 images per client, local parquet files in the
``data-files`` layout), with the app's real ``client_fn``.

Measured per run:

* per-client state: bytes of the ``context.state`` records of a client that took part
  (``RecordDict`` values' ``count_bytes``), and how many clients hold state after the rounds;
* round seconds (``rounds.csv``'s ``seconds``: sampled clients' fit + aggregation + evaluation);
* peak RSS of the process (``resource.getrusage``), and the RSS before the first round;
* "all clients hold state": every client without state gets a distinct copy of a participant's
  state (what a long run converges to once every client took part), then one more round runs;
  its peak RSS is the steady-state memory of the federation.

    python -m benchmarks.scale [--methods fedavg fedbif ef-signsgd signsgd]
        [--clients 100 1000] [--rounds 2] [--fraction 0.1] [--model cnn4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from benchmarks.framework_overhead import write_cifar_stand_in
from tools.inprocess import make_contexts, run_inprocess


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def state_bytes(context: Context) -> int:
    """Bytes of a node's persistent state, as Flower's records count them."""
    return sum(record.count_bytes() for record in context.state.values())


def clone_state(state: RecordDict) -> RecordDict:
    """A deep copy whose arrays are new buffers (``copy.deepcopy`` would share the immutable
    ``bytes`` of each ``Array`` and so not cost the memory a real client's state does)."""
    clone = RecordDict()
    for key, record in state.items():
        if isinstance(record, ArrayRecord):
            clone[key] = ArrayRecord({k: Array(v.numpy().copy()) for k, v in record.items()})
        elif isinstance(record, ConfigRecord):
            clone[key] = ConfigRecord(dict(record))
        else:
            raise TypeError(f"cannot copy a {type(record).__name__}")
    return clone


def data_folder(args: argparse.Namespace, clients: int, workdir: Path) -> Path:
    """The synthetic data of a federation size, written once (by the parent process, so that
    writing it does not count in a measured process's memory)."""
    data = workdir / f"data-{clients}"
    if not data.exists():
        write_cifar_stand_in(data, args.samples * clients, args.test_samples)
    return data


def run_config(args: argparse.Namespace, method: str, clients: int, workdir: Path) -> dict:
    """The run config of one measurement."""
    data = data_folder(args, clients, workdir)
    return {
        "strategy": method,
        "dataset": "cifar10",
        "data-files": str(data),
        "model": args.model,
        "partitioner": "iid",
        "num-server-rounds": args.rounds,
        "fraction-fit": args.fraction,
        "min-available-clients": clients,
        "local-epochs": 1,
        "batch-size": 32,
        "device": "cpu",
        "checkpoint": False,
        "results-dir": str(workdir / "results"),
        "run-name": f"{method}-{clients}",
    }


def measure(args: argparse.Namespace, method: str, clients: int, workdir: Path) -> dict:
    """One (method, clients) measurement in this process; see the module docstring."""
    config = run_config(args, method, clients, workdir)
    contexts = make_contexts(config, clients)
    rss_before = rss_bytes()
    started = time.perf_counter()
    strategy = run_inprocess(config, clients, contexts=contexts)
    wall = time.perf_counter() - started
    rounds = [row["seconds"] for row in strategy.history if row["round"] > 0]
    sizes = [state_bytes(c) for c in contexts]
    holders = [c for c, size in zip(contexts, sizes, strict=True) if size > 0]
    result: dict[str, Any] = {
        "method": method,
        "clients": clients,
        "participants_per_round": max(1, round(args.fraction * clients)),
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak_rss_bytes(),
        "round_seconds": rounds,
        "wall_seconds": wall,
        "clients_with_state": len(holders),
        "state_bytes_per_client": max(sizes),
        "state_bytes_total": sum(sizes),
    }
    if holders:  # steady state: every client holds its own state, then one more round
        for context in contexts:
            if not context.state.values():
                context.state = clone_state(holders[0].state)
        result["full_state_bytes_total"] = sum(state_bytes(c) for c in contexts)
        result["full_state_rss_bytes"] = rss_bytes()
        started = time.perf_counter()
        extra = run_inprocess(
            {**config, "num-server-rounds": 1, "run-name": f"{method}-{clients}-full"},
            clients,
            contexts=contexts,
        )
        result["full_state_round_seconds"] = extra.history[-1]["seconds"]
        result["full_state_peak_rss_bytes"] = peak_rss_bytes()
        result["full_state_seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods", nargs="+", default=["fedavg", "fedbif", "ef-signsgd", "signsgd"]
    )
    parser.add_argument("--clients", nargs="+", type=int, default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fraction", type=float, default=0.1, help="fraction-fit")
    parser.add_argument("--samples", type=int, default=8, help="images per client")
    parser.add_argument("--test-samples", type=int, default=100)
    parser.add_argument("--model", default="cnn4")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--workdir", type=Path, default=None, help="data/results folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "CLIENTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.worker:  # one measurement, JSON on the last stdout line
        method, clients = args.worker[0], int(args.worker[1])
        print(json.dumps(measure(args, method, clients, args.workdir)))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        workdir = args.workdir or Path(tmp)
        for clients in args.clients:
            data_folder(args, clients, workdir)
            for method in args.methods:
                command = [
                    sys.executable,
                    "-m",
                    "benchmarks.scale",
                    "--worker",
                    method,
                    str(clients),
                    "--workdir",
                    str(workdir),
                ]
                for flag in ("rounds", "fraction", "samples", "test_samples", "model", "threads"):
                    command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise SystemExit(f"{method} x {clients} failed:\n{done.stderr[-3000:]}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print_row(rows[-1], header=len(rows) == 1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"args": {**vars(args), "json": str(args.json), "workdir": None}, "rows": rows},
                indent=1,
            )
            + "\n"
        )


def print_row(row: dict, header: bool) -> None:
    """One markdown table row (MB = 10^6 bytes, GB = 10^9 bytes)."""
    if header:
        print(
            "| method | clients (per round) | state / client | RSS before round 1 "
            "| clients with state | round s | peak RSS "
            "| all clients hold state: state | RSS | peak RSS | round s |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    full = (
        f"{row['full_state_bytes_total'] / 1e9:.2f} GB | "
        f"{row['full_state_rss_bytes'] / 1e9:.2f} GB | "
        f"{row['full_state_peak_rss_bytes'] / 1e9:.2f} GB | "
        f"{row['full_state_round_seconds']:.1f}"
        if "full_state_bytes_total" in row
        else "- | - | - | -"
    )
    print(
        f"| {row['method']} | {row['clients']} ({row['participants_per_round']}) | "
        f"{row['state_bytes_per_client'] / 1e6:.2f} MB | {row['rss_before_bytes'] / 1e9:.2f} GB | "
        f"{row['clients_with_state']} | "
        f"{float(np.median(row['round_seconds'])):.1f} | {row['peak_rss_bytes'] / 1e9:.2f} GB | "
        f"{full} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
