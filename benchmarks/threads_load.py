"""``make run``'s two runs on a quiet machine and beside a CPU load, old thread default vs new.

``make run`` is a FedBiF run through ``flwr run`` (10 Ray clients at one CPU each) and a FedAvg
run of the same setting in one process. Before the ``torch-threads`` auto default, the server and
the in-process run used torch's default (one thread per core) while Ray pinned its clients to
one; beside other jobs an OpenMP team larger than the cores it gets spins at every barrier.
This script times both runs four ways: {quiet, beside ``--load`` busy processes} x {old, new}.
"old" is emulated with the keys that reproduce it exactly: ``server-torch-threads=<cores>`` for
the ``flwr run`` (its Ray clients were at 1 thread then as now) and ``torch-threads=<cores>`` for
the in-process FedAvg run; "new" sets no thread key.

    .venv/bin/python -m benchmarks.threads_load [--rounds 20] [--load 2] [--json PATH]

Run it on an otherwise idle machine: the quiet rows must be quiet.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

from core.torch_utils import available_cpus
from tools.inprocess import run_inprocess
from tools.launch import launch, toml_overrides


def burn(stop: Any) -> None:
    """A CPU-bound process: the 'other job' of a busy machine."""
    x = 0
    while not stop.is_set():
        x += 1


def timed(action: Any) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def measure(rounds: int, clients: int, mode: str, folder: Path) -> dict[str, float]:
    """Wall seconds of the flwr run and of the in-process FedAvg run, in ``mode``."""
    cores = available_cpus()
    common: dict[str, Any] = {
        "num-server-rounds": rounds,
        "results-dir": str(folder),
        "checkpoint": False,
        "device": "cpu",
    }
    flwr_keys = {"server-torch-threads": cores} if mode == "old" else {}
    local_keys = {"torch-threads": cores} if mode == "old" else {}

    def flwr() -> None:
        config = {**common, **flwr_keys, "strategy": "fedbif", "run-name": f"fedbif-{mode}"}
        code, status, _ = launch(toml_overrides(config), num_supernodes=clients)
        if code != 0:
            raise RuntimeError(f"flwr run failed: {status}")

    def local() -> None:
        config = {**common, **local_keys, "strategy": "fedavg", "run-name": f"fedavg-{mode}"}
        run_inprocess(config, num_clients=clients)

    return {"flwr_seconds": timed(flwr), "inprocess_seconds": timed(local)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--load", type=int, default=2, help="busy processes beside the runs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    for loaded in (False, True):
        stop = multiprocessing.Event()
        burners = [
            multiprocessing.Process(target=burn, args=(stop,), daemon=True)
            for _ in range(args.load if loaded else 0)
        ]
        for process in burners:
            process.start()
        try:
            for mode in ("old", "new"):
                with tempfile.TemporaryDirectory() as folder:
                    times = measure(args.rounds, args.clients, mode, Path(folder))
                total = times["flwr_seconds"] + times["inprocess_seconds"]
                row = {"load": args.load if loaded else 0, "mode": mode, **times, "total": total}
                rows.append(row)
                print(
                    f"load {row['load']} {mode}: flwr run {times['flwr_seconds']:.1f} s, "
                    f"in-process FedAvg {times['inprocess_seconds']:.1f} s, total {total:.1f} s",
                    flush=True,
                )
        finally:
            stop.set()
            for process in burners:
                process.join()
    quiet = {row["mode"]: row["total"] for row in rows if row["load"] == 0}
    for row in rows:
        row["vs_quiet_same_mode"] = row["total"] / quiet[row["mode"]]
        row["vs_quiet_new"] = row["total"] / quiet["new"]
    print("\n| load | default | flwr run s | in-process FedAvg s | total s | / quiet (same) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['load']} | {row['mode']} | {row['flwr_seconds']:.1f} | "
            f"{row['inprocess_seconds']:.1f} | {row['total']:.1f} | "
            f"{row['vs_quiet_same_mode']:.2f}x |"
        )
    if args.json:
        from benchmarks.common import write_json

        write_json(args.json, {"cores": available_cpus(), "rounds": args.rounds, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
