"""The main job (``make run``): the default method through ``flwr run``, beside FedAvg.

A newcomer should see what the toolkit is for in one command: the default strategy (FedBiF)
runs on a local simulation federation through ``flwr run`` (``tools.launch``), and the closing
summary sets its accuracy and measured traffic beside FedAvg's on exactly the same setting.

The FedAvg figures come from a real run, never from a formula: it runs in one process
(``tools.inprocess``: the same client_fn, strategy and serialization, without Ray's start-up;
``tests/test_deploy.py`` checks both paths give equal rounds) and is cached under
``<results-dir>/.baselines/`` by a key of its full run config, the number of clients and the
code version (a hash of the app's sources). Change any of them and it runs again.

    python -m tools.main_job [--num-supernodes 10] [--run-config "k=v ..."] [--results-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.plots import PLOT_NAME, plot_comparison
from core.results import read_rounds
from core.run_identity import identity_config
from core.settings import parse_overrides
from tools.launch import PROJECT_ROOT, launch

BASELINE = "fedavg"
#: wire keys whose ``auto`` a method resolves for itself (``CommunicationStrategy.resolve_wire``).
WIRE_KEYS = ("entropy", "downlink-reference", "uplink-reference")
AUTO = "auto"
#: what the code version hashes: every package's Python sources, the app's config and the agent.
SOURCE_PACKAGES = ("compression", "core", "contracts", "clients", "strategies", "fl_app", "tools")
EXTRA_SOURCES = ("pyproject.toml", "clients/lbi_agent.json")
MB = 1e6
COMPARISON_PLOT = "main-job.png"


def code_version(root: Path = PROJECT_ROOT) -> str:
    """A hash of the sources that decide a run's numbers (a change anywhere reruns the baseline)."""
    digest = hashlib.sha256()
    files = sorted(p for pkg in SOURCE_PACKAGES for p in (root / pkg).rglob("*.py"))
    files += [root / name for name in EXTRA_SOURCES if (root / name).exists()]
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def effective_config(run_config: str) -> dict[str, Any]:
    """Every run-config value the run will use (defaults filled in, ``model=auto`` resolved)."""
    from fl_app.methods import load_config

    cfg, _ = load_config(parse_overrides(run_config))
    return cfg.as_dict()


def baseline_key(config: Mapping[str, Any], num_clients: int, version: str) -> str:
    """Cache key of the FedAvg run that matches ``config`` (where results go is not part of it)."""
    relevant = identity_config(config)
    blob = json.dumps({"config": relevant, "clients": num_clients, "code": version}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_baseline(config: Mapping[str, Any], num_clients: int, cache: Path) -> tuple[Path, bool]:
    """FedAvg on ``config``'s setting: (its results folder, whether it came from the cache)."""
    fedavg = {
        **config,
        "strategy": BASELINE,
        "checkpoint": False,
        "resume-from": "",
        # the method's lossless stages were resolved for it; FedAvg's are resolved for FedAvg
        **dict.fromkeys(WIRE_KEYS, AUTO),
    }
    key = baseline_key(fedavg, num_clients, code_version())
    run_dir = cache / f"{BASELINE}-{key}"
    if _completed(run_dir):
        return run_dir, True
    from tools.inprocess import run_inprocess

    fedavg |= {"results-dir": str(cache), "run-name": run_dir.name}
    run_inprocess(fedavg, num_clients=num_clients)
    if not _completed(run_dir):
        raise RuntimeError(f"the FedAvg comparison run left no completed summary in {run_dir}")
    return run_dir, False


def _completed(run_dir: Path) -> bool:
    try:
        return bool(json.loads((run_dir / "summary.json").read_text()).get("completed"))
    except (OSError, ValueError):
        return False


def comparison_table(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """A plain-text table of final accuracy and measured traffic, one line per run."""
    header = (
        f"{'method':<10} {'final acc':>9} {'up MB':>9} {'down MB':>9} {'total MB':>9} "
        f"{'up bpp':>7} {'down bpp':>8}"
    )
    lines = [header, "-" * len(header)]
    for label, s in rows:
        up, down = s["uplink_bytes"] / MB, s["downlink_bytes"] / MB
        accuracy = s.get("final_accuracy")
        acc_text = f"{100 * accuracy:8.2f}%" if accuracy is not None else f"{'n/a':>9}"
        lines.append(
            f"{label:<10} {acc_text} {up:9.3f} {down:9.3f} {up + down:9.3f} "
            f"{s['uplink_bpp']:7.2f} {s['downlink_bpp']:8.2f}"
        )
    return "\n".join(lines)


def savings_line(method: Mapping[str, Any], baseline: Mapping[str, Any]) -> str:
    """How many times fewer bytes the method moved than FedAvg, per direction and in total."""

    def ratio(a: float, b: float) -> str:
        return f"{b / a:.1f}x" if a > 0 else "n/a"

    up, down = method["uplink_bytes"], method["downlink_bytes"]
    base_up, base_down = baseline["uplink_bytes"], baseline["downlink_bytes"]
    acc, base_acc = method.get("final_accuracy"), baseline.get("final_accuracy")
    gap = (
        f"; accuracy {100 * (acc - base_acc):+.2f} points"
        if acc is not None and base_acc is not None
        else ""
    )
    return (
        f"{method['strategy']} moved {ratio(up + down, base_up + base_down)} fewer bytes than "
        f"{BASELINE} in total (uplink {ratio(up, base_up)}, downlink {ratio(down, base_down)})"
        f"{gap}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", default="", help='TOML overrides, e.g. "seed=7"')
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--federation-config", default="", help="overrides --num-supernodes")
    parser.add_argument("--results-dir", type=Path, default=PROJECT_ROOT / "results")
    parser.add_argument("--log", type=Path, default=None, help="also write the run's log here")
    args = parser.parse_args(argv)
    run_config = f"results-dir='{args.results_dir.resolve()}' {args.run_config}".strip()
    code, status, run_dir = launch(
        run_config, args.num_supernodes, args.federation_config, log_path=args.log
    )
    print(f"\nrun status: {status}")
    if code != 0 or run_dir is None:
        return code or 1
    summary = json.loads((run_dir / "summary.json").read_text())
    config = summary["config"]
    rows: list[tuple[str, Mapping[str, Any]]] = [(summary["strategy"], summary)]
    notes = [f"results: {run_dir}/rounds.csv and {run_dir}/summary.json"]
    if (run_dir / PLOT_NAME).exists():
        notes.append(f"curves:  {run_dir / PLOT_NAME}")
    if summary["strategy"] != BASELINE:
        print(f"\n{BASELINE} on the same setting, for comparison ...")
        num_clients = int(summary.get("num_clients") or args.num_supernodes)
        cache = args.results_dir.resolve() / ".baselines"
        base_dir, cached = run_baseline(config, num_clients, cache)
        baseline = json.loads((base_dir / "summary.json").read_text())
        rows.append((BASELINE, baseline))
        origin = "cached run of the same config and code" if cached else "run just now"
        notes.append(f"{BASELINE}:  {base_dir} ({origin}, in one process)")
    print("\n" + comparison_table(rows))
    if len(rows) == 2:
        print(savings_line(rows[0][1], rows[1][1]))
        picture = (
            run_dir / COMPARISON_PLOT
        )  # in the run's own folder: another run never replaces it
        plot_comparison(
            {
                summary["strategy"]: read_rounds(run_dir / "rounds.csv"),
                BASELINE: read_rounds(base_dir / "rounds.csv"),
            },
            picture,
            f"{summary['strategy']} vs {BASELINE}, same setting ({run_dir.name})",
        )
        notes.append(f"side by side: {picture}")
    print("\n".join(["", *notes]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
