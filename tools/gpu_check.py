"""The project's GPU check (``make gpu-check``): everything that needs CUDA, in one table.

1. ``pytest -m cuda``: the tests that exercise CUDA (device selection, every method's client
   fit on CUDA, fractional ``client-resources-num-gpus`` with several clients per GPU, the INT8
   kernel path of LBI-FL against the exact reference);
2. one ``flwr run`` per seed method (FedAvg and the methods of the seed papers) with
   ``device='cuda'`` on a local simulation federation of ``--supernodes`` clients sharing the GPU
   (``client-resources-num-gpus=--gpus-per-client``, 0.25: four clients per GPU);
3. the methods benchmark (``benchmarks.methods_bench``) on resnet18 on the GPU: each method's
   local fit time against FedAvg's on the same GPU, and LBI-FL once more on fake quantization
   (``--int8-mode never``) beside its integer kernels.

It prints one table (check, result, seconds, detail), keeps every step's log under
``--log-dir``, and exits non-zero if any check failed. On a machine without CUDA it says so and
exits 0: the CPU test suite covers the rest there.

    python -m tools.gpu_check [--rounds 2] [--supernodes 4] [--gpus-per-client 0.25]
        [--methods fedavg fedbif ...] [--samples 256] [--skip-flwr] [--skip-bench]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tools.launch import PROJECT_ROOT, launch, offline_environment

#: FedAvg and the methods of the seed papers (FedBiF, FedBAT, clipped UQ, LBI-FL).
SEED_METHODS: tuple[str, ...] = ("fedavg", "fedbif", "fedbat", "clipped-uq", "lbi-fl")
SKIP_MESSAGE = "no CUDA device (torch.cuda.is_available() is False): GPU check skipped"
#: pytest's closing line, "=== 3 passed, 1 skipped in 2.00s ===" (or without the rules, -q).
PYTEST_SUMMARY = re.compile(
    r"^=* ?(\d+ (?:passed|failed|errors?|skipped|deselected).*?) in [\d.]+s"
)


@dataclass
class Check:
    name: str
    ok: bool
    seconds: float
    detail: str


def run_logged(command: list[str], log: Path, timeout: float) -> tuple[int, str]:
    """Run ``command`` from the project root, its output into ``log``; (exit code, output)."""
    env = offline_environment(PROJECT_ROOT / ".flwr")
    try:
        done = subprocess.run(
            command,
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        code = 124
        output = f"{err.stdout or ''}{err.stderr or ''}\ntimed out after {timeout:.0f} s"
    log.write_text(output if isinstance(output, str) else str(output))
    return code, output


def check_pytest(log_dir: Path, timeout: float) -> Check:
    """The CUDA-marked tests; a skipped or missing test counts as a failure on a GPU box."""
    started = time.perf_counter()
    log = log_dir / "pytest-cuda.log"
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider"]
    code, output = run_logged(command, log, timeout)
    found = [m.group(1) for line in output.splitlines() if (m := PYTEST_SUMMARY.match(line))]
    summary = found[-1] if found else f"exit code {code}"
    ok = code == 0 and "skipped" not in summary and "passed" in summary
    detail = summary if ok else f"{summary} (log: {log})"
    return Check("pytest -m cuda", ok, time.perf_counter() - started, detail)


def check_flwr_run(
    method: str, rounds: int, supernodes: int, gpus: float, log_dir: Path, results: Path
) -> Check:
    """One ``flwr run`` of ``method`` with every client on CUDA, ``gpus`` GPU each."""
    started = time.perf_counter()
    log = log_dir / f"flwr-{method}.log"
    run_config = (
        f"strategy='{method}' device='cuda' num-server-rounds={rounds} "
        f"min-available-clients={supernodes} results-dir='{results}' run-name='{method}'"
    )
    federation = (
        f"num-supernodes={supernodes} client-resources-num-cpus=1 client-resources-num-gpus={gpus}"
    )
    with contextlib.redirect_stdout(io.StringIO()):
        code, status, results_dir = launch(run_config, supernodes, federation, log_path=log)
    detail = status
    summary = (results_dir or results / method) / "summary.json"
    if code == 0 and summary.exists():
        final = json.loads(summary.read_text()).get("final_accuracy")
        if isinstance(final, int | float):
            detail += f", accuracy {100 * final:.2f}% after {rounds} rounds"
    if code != 0:
        detail += f" (log: {log})"
    name = f"flwr run {method} (cuda, {gpus:g} GPU/client)"
    return Check(name, code == 0, time.perf_counter() - started, detail)


BENCH_ROW = re.compile(r"^\| (\S+) \| (\S+) \| ([^|]+) \| ([^|]+) \| ([\d.]+) \| ([\d.]+) \|")


def check_bench(
    log_dir: Path, samples: int, timeout: float, methods: list[str] | None, int8_mode: str
) -> list[Check]:
    """The methods benchmark on resnet18 on CUDA; one row per method (fit time vs FedAvg)."""
    started = time.perf_counter()
    tag = "" if int8_mode == "auto" else f"-int8-{int8_mode}"
    log = log_dir / f"methods-bench{tag}.log"
    command = [
        sys.executable,
        "-m",
        "benchmarks.methods_bench",
        "--models",
        "resnet18",
        "--device",
        "cuda",
        "--samples",
        str(samples),
        "--int8-mode",
        int8_mode,
    ]
    if methods:
        command += ["--methods", *methods]
    code, output = run_logged(command, log, timeout)
    seconds = time.perf_counter() - started
    rows = [m for line in output.splitlines() if (m := BENCH_ROW.match(line.strip()))]
    label = "" if int8_mode == "auto" else f" (int8 {int8_mode}: fake quant)"
    checks = [
        Check(
            f"bench resnet18 {m.group(2)}{label}",
            True,
            float(m.group(5)),
            f"fit {float(m.group(5)):.3f} s = {float(m.group(6)):.2f}x FedAvg, "
            f"up {m.group(3).strip()}",
        )
        for m in rows
    ]
    if code != 0 or not rows:
        checks.append(
            Check(f"bench resnet18{label}", False, seconds, f"exit code {code} (log: {log})")
        )
    return checks


def format_table(checks: list[Check]) -> str:
    width = max([len(c.name) for c in checks] + [5])
    lines = [f"{'check':<{width}}  result  seconds  detail", "-" * (width + 40)]
    for c in checks:
        result = "ok" if c.ok else "FAILED"
        lines.append(f"{c.name:<{width}}  {result:<6}  {c.seconds:7.2f}  {c.detail}")
    return "\n".join(lines)


def device_line() -> str:
    props = torch.cuda.get_device_properties(0)
    memory = props.total_memory / 2**30
    return (
        f"GPU: {props.name} ({memory:.0f} GiB, sm_{props.major}{props.minor}), "
        f"{torch.cuda.device_count()} visible; torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each flwr run")
    parser.add_argument("--supernodes", type=int, default=4, help="clients of each flwr run")
    parser.add_argument("--gpus-per-client", type=float, default=0.25)
    parser.add_argument("--methods", nargs="+", default=list(SEED_METHODS), help="flwr runs")
    parser.add_argument("--samples", type=int, default=256, help="benchmark images per fit")
    parser.add_argument("--skip-flwr", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per step")
    parser.add_argument("--log-dir", type=Path, default=PROJECT_ROOT / ".flwr" / "gpu-check")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(SKIP_MESSAGE)
        return 0
    args.log_dir.mkdir(parents=True, exist_ok=True)
    print(device_line(), flush=True)
    checks = [check_pytest(args.log_dir, args.timeout)]
    print(f"[gpu-check] {checks[-1].name}: {'ok' if checks[-1].ok else 'FAILED'}", flush=True)
    if not args.skip_flwr:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as results:
            for method in args.methods:
                checks.append(
                    check_flwr_run(
                        method,
                        args.rounds,
                        args.supernodes,
                        args.gpus_per_client,
                        args.log_dir,
                        Path(results),
                    )
                )
                print(f"[gpu-check] {checks[-1].name}: {checks[-1].detail}", flush=True)
    if not args.skip_bench:
        checks += check_bench(args.log_dir, args.samples, args.timeout, None, "auto")
        checks += check_bench(
            args.log_dir, args.samples, args.timeout, ["fedavg", "lbi-fl"], "never"
        )
    print()
    print(format_table(checks))
    print(device_line())
    failed = [c.name for c in checks if not c.ok]
    if failed:
        print(f"{len(failed)} check(s) failed: {', '.join(failed)}")
        return 1
    print(f"all {len(checks)} checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
