"""Where a `flwr run` round's CPU goes: a sampling profile of every process of the run.

Starts one ``flwr run`` (FedAvg, the ``benchmarks.framework_overhead`` settings: ``cnn4`` on a
synthetic CIFAR-10 stand-in, or ``digits``) on the local Ray simulation, waits for its first
steady round, and samples every process of the run (SuperLink, simulation/ServerApp, Ray's
workers and daemons; found by the run's own ``FLWR_HOME``) with ``py-spy`` for ``--seconds``.
Each sample (a Python stack of a thread that was running, idle threads excluded) is put in the
bucket of its innermost frame that any rule matches (rules in this order within a frame):

* ``torch (training, evaluation)``: torch;
* ``serialization``: NumPy ``save``/``load``, protobuf, pickle, msgpack, Flower's record and
  array conversions;
* ``app (codecs, strategy, client)``: the project's own packages;
* ``Flower``: ``flwr`` frames;
* ``Ray``: ``ray`` frames;
* ``other``: the rest (threading, asyncio, gRPC, the standard library).

    .venv/bin/python -m benchmarks.round_profile [--setting cnn4] [--seconds 20] [--json PATH]

py-spy needs ptrace rights (root, or ``kernel.yama.ptrace_scope=0``).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from benchmarks.framework_overhead import setting_config, toml_overrides
from deploy.procs import pids_with_environment
from tools.launch import launch

RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("torch (training, evaluation)", re.compile(r"[(/]torch/")),
    (
        "serialization",
        re.compile(
            r"[(/]numpy/lib/(_npyio|format)|[(/]google/protobuf|pickle|msgpack|"
            r"[(/]flwr/common/(serde|record|parameter|typing|inflatable)|[(/]flwr/proto/"
        ),
    ),
    (
        "app (codecs, strategy, client)",
        re.compile(r"[(/](compression|strategies|clients|contracts|core|fl_app)/"),
    ),
    ("Flower", re.compile(r"[(/]flwr/")),
    ("Ray", re.compile(r"[(/]ray/")),
)
KIND_PATTERNS = (
    ("Ray worker (ClientApp)", re.compile(r"ray::|default_worker\.py")),
    ("simulation + ServerApp", re.compile(r"flwr-simulation|flower-simulation|serverapp")),
    ("SuperLink", re.compile(r"flower-superlink")),
)


def bucket(stack: str) -> str:
    """The bucket of one collapsed stack: that of its innermost frame any rule matches."""
    for frame in reversed(stack.split(";")):
        for name, pattern in RULES:
            if pattern.search(frame):
                return name
    return "other"


def process_kind(header: str) -> str:
    for name, pattern in KIND_PATTERNS:
        if pattern.search(header):
            return name
    return "other process (Ray daemons, CLI)"


def py_spy() -> str | None:
    """The ``py-spy`` beside this interpreter (a venv), else the first on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def profile_pids(pids: list[int], seconds: float, out_dir: Path) -> list[Path]:
    """One ``py-spy record --format raw`` per process, side by side."""
    calls, paths = [], []
    for pid in pids:
        path = out_dir / f"{pid}.txt"
        calls.append(
            subprocess.Popen(
                [
                    py_spy() or "py-spy",
                    "record",
                    "--pid", str(pid),
                    "--duration", str(int(seconds)),
                    "--rate", "50",
                    "--format", "raw",
                    "--nonblocking",
                    "--output", str(path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
        paths.append(path)
    for call in calls:
        call.wait(timeout=seconds + 60)
    return [p for p in paths if p.exists()]


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="cnn4", choices=["cnn4", "digits"])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--test-samples", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if py_spy() is None:
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    workdir = Path(tempfile.mkdtemp(prefix="round-profile-"))
    config = setting_config(args.setting, args, workdir)
    home = workdir / "flwr-home"
    federation = f"num-supernodes={args.clients} client-resources-num-cpus=2"
    done: dict[str, object] = {}

    def run() -> None:
        done["result"] = launch(
            toml_overrides(config), args.clients, federation, flwr_home=home,
            log_path=workdir / "run.log",
        )  # fmt: skip

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    rounds_csv = workdir / "results" / args.setting / "rounds.csv"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # round 2 started: round 1 recorded
        if rounds_csv.exists() and len(rounds_csv.read_text().splitlines()) >= 3:
            break
        time.sleep(0.5)
    else:
        raise SystemExit(f"no steady round within 600 s; log: {workdir / 'run.log'}")
    pids = sorted(pids_with_environment("FLWR_HOME", str(home)))
    headers = {pid: command_line(pid) for pid in pids}
    paths = profile_pids(pids, args.seconds, workdir)
    thread.join(timeout=900)
    samples: dict[str, Counter[str]] = defaultdict(Counter)
    for path in paths:
        kind = process_kind(headers.get(int(path.stem), ""))
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                samples[kind][bucket(stack)] += int(count)
    rate = 50.0
    total = sum(sum(c.values()) for c in samples.values())
    print(
        f"{args.setting}: {len(pids)} processes sampled for {args.seconds:g} s of steady rounds "
        f"at {rate:g} Hz; CPU seconds by process kind and bucket (share of all sampled CPU)\n"
    )
    buckets = [name for name, _ in RULES] + ["other"]
    print("| process | " + " | ".join(buckets) + " | all |")
    print("|---|" + "---|" * (len(buckets) + 1))
    for kind, counter in sorted(samples.items(), key=lambda kv: -sum(kv[1].values())):
        cells = [f"{counter[b] / rate:.1f} s ({100 * counter[b] / total:.0f}%)" for b in buckets]
        print(f"| {kind} | " + " | ".join(cells) + f" | {sum(counter.values()) / rate:.1f} s |")
    print(f"\nstatus of the run: {done.get('result', ('?', 'unfinished'))[1]}")  # type: ignore[index]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({k: dict(v) for k, v in samples.items()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
