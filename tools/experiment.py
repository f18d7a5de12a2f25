"""Experiment harness: a grid of run configs x seeds -> runs -> paper-style tables and plots.

    python -m tools.experiment run experiments/digits.toml      # resumable; skips finished points
    python -m tools.experiment report experiments/digits.toml   # tables (Markdown, CSV) + PNGs
    python -m tools.experiment run FILE --runner inprocess       # no Ray: quick sweeps

An experiment file (TOML):

    name = "digits"                 # results go to <output>/<name>/<point>/
    output = "benchmarks/results"   # relative to the file's folder
    seeds = [1, 2, 3]
    target-accuracy = 0.95          # the table reports uplink MB needed to first reach it
    requires = "cpu"                # informational: "cpu" or "gpu + network"
    [fixed]                         # run-config keys shared by every point
    dataset = "digits"
    num-server-rounds = 20
    [federation]                    # flwr --federation-config
    num-supernodes = 10
    [[grid.setting]]                # an axis of tables (any name); every combination of one
                                    # entry per axis is a point
    partitioner = "iid"
    [[grid.setting]]
    partitioner = "dirichlet"
    dirichlet-alpha = 0.5
    [grid]
    strategy = ["fedavg", "fedbif"] # a plain list is an axis over one key

Every point runs through ``flwr run`` (``tools.launch``) with the offline settings; a point whose
``summary.json`` says ``completed`` is skipped, so an interrupted experiment picks up where it was.
A failed run stops the experiment with a non-zero exit.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import sys
import time
import tomllib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.results import read_rounds

GROUP_KEYS = (
    "dataset",
    "model",
    "partitioner",
    "dirichlet-alpha",
    "dirichlet-min-size",
    "dirichlet-self-balancing",
    "labels-per-client",
)


@dataclass(frozen=True)
class Point:
    """One run of the grid: its folder name and complete run-config overrides."""

    name: str
    config: dict[str, Any]


@dataclass
class Experiment:
    """A parsed experiment file."""

    name: str
    output: Path
    seeds: list[int]
    fixed: dict[str, Any]
    axes: list[list[dict[str, Any]]]
    federation: dict[str, Any] = field(default_factory=dict)
    target_accuracy: float = 0.9
    requires: str = "cpu"

    @property
    def folder(self) -> Path:
        return self.output / self.name

    def points(self) -> list[Point]:
        """Cartesian product of the axes, times the seeds; seed-major, so an interrupted
        experiment has whole tables for its first seeds."""
        points = []
        for seed in self.seeds:
            for combo in itertools.product(*self.axes) if self.axes else [()]:
                merged: dict[str, Any] = dict(self.fixed)
                for setting in combo:
                    merged.update(setting)
                config = {**merged, "seed": seed}
                points.append(Point(point_name(config, self.fixed), config))
        names = [p.name for p in points]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: two grid points share a name; make the grid distinct")
        return points


def load_experiment(path: Path) -> Experiment:
    """Parse an experiment file; every run-config key is validated later by the app itself."""
    data = tomllib.loads(path.read_text())
    unknown = set(data) - {
        "name",
        "output",
        "seeds",
        "fixed",
        "grid",
        "federation",
        "target-accuracy",
        "requires",
        "description",
    }
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}")
    axes: list[list[dict[str, Any]]] = []
    for key, values in data.get("grid", {}).items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: grid.{key} must be a non-empty list")
        if all(isinstance(v, dict) for v in values):  # [[grid.NAME]] tables: several keys each
            axes.append([dict(v) for v in values])
        elif any(isinstance(v, dict) for v in values):
            raise ValueError(f"{path}: grid.{key} mixes tables and values")
        else:
            axes.append([{key: v} for v in values])
    output = Path(data.get("output", "results/experiments"))
    return Experiment(
        name=str(data.get("name", path.stem)),
        output=output if output.is_absolute() else (path.parent / output).resolve(),
        seeds=[int(s) for s in data.get("seeds", [42])],
        fixed=dict(data.get("fixed", {})),
        axes=axes,
        federation=dict(data.get("federation", {})),
        target_accuracy=float(data.get("target-accuracy", 0.9)),
        requires=str(data.get("requires", "cpu")),
    )


def point_name(config: Mapping[str, Any], fixed: Mapping[str, Any]) -> str:
    """Folder name from the keys that vary (strategy first, seed last)."""
    varying = {k: v for k, v in config.items() if k not in fixed or fixed[k] != v}
    ordered = sorted(varying, key=lambda k: (k != "strategy", k == "seed", k))
    text = "_".join(f"{k}={varying[k]}" for k in ordered)
    return re.sub(r"[^A-Za-z0-9=._-]+", "-", text)


def toml_value(value: Any) -> str:
    """A run-config value as TOML for ``--run-config``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def is_finished(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and bool(json.loads(summary.read_text()).get("completed"))


Runner = Callable[[Point, Path], None]


def flwr_runner(experiment: Experiment) -> Runner:
    """Run a point with ``flwr run`` on a local simulation; raise if the run did not complete."""
    from tools.launch import launch

    federation = " ".join(f"{k}={toml_value(v)}" for k, v in experiment.federation.items())

    def run(point: Point, folder: Path) -> None:
        overrides = {**point.config, "results-dir": str(folder), "run-name": point.name}
        run_config = " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())
        code, status, _ = launch(
            run_config, federation_config=federation, log_path=folder / f"{point.name}.log"
        )
        if code != 0:
            raise RuntimeError(
                f"point {point.name} failed ({status}); log: {folder / (point.name + '.log')}"
            )

    return run


def inprocess_runner(experiment: Experiment) -> Runner:
    """Run a point in this process (``tools.inprocess``): no Ray or SuperLink start-up per
    point, same strategy/client code and byte accounting; for quick sweeps on small data."""
    from tools.inprocess import run_inprocess

    clients = int(experiment.federation.get("num-supernodes", 10))

    def run(point: Point, folder: Path) -> None:
        run_inprocess(
            {**point.config, "results-dir": str(folder), "run-name": point.name},
            num_clients=clients,
        )

    return run


RUNNERS = {"flwr": flwr_runner, "inprocess": inprocess_runner}


def run_experiment(
    experiment: Experiment, runner: Runner | None = None, echo: Callable[[str], None] = print
) -> int:
    """Run every unfinished point; returns how many ran. Raises on the first failed run."""
    runner = runner or flwr_runner(experiment)
    experiment.folder.mkdir(parents=True, exist_ok=True)
    points = experiment.points()
    todo = [p for p in points if not is_finished(experiment.folder / p.name)]
    echo(
        f"{experiment.name}: {len(points)} points, {len(points) - len(todo)} done, "
        f"{len(todo)} to run"
    )
    started = time.monotonic()
    for index, point in enumerate(todo, start=1):
        runner(point, experiment.folder)
        if not is_finished(experiment.folder / point.name):
            raise RuntimeError(f"point {point.name} left no completed summary.json")
        elapsed = time.monotonic() - started
        eta = elapsed / index * (len(todo) - index)
        echo(
            f"[{len(points) - len(todo) + index}/{len(points)}] {point.name} done; "
            f"elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min"
        )
    return len(todo)


# ------------------------------------------------------------------------------ report
@dataclass
class RunResult:
    """What the report needs of one finished run."""

    config: dict[str, Any]
    summary: dict[str, Any]
    rounds: list[dict[str, float]]
    #: the row label: the strategy and its settings that vary in the experiment.
    label: str = ""

    @property
    def method(self) -> str:
        return self.label or str(self.config["strategy"])

    @property
    def group(self) -> tuple[str, ...]:
        return tuple(
            f"{k}={self.config[k]}"
            for k in GROUP_KEYS
            if k in self.config and _relevant(k, self.config)
        )

    def uplink_mb_to_reach(self, target: float) -> float:
        """Cumulative uplink MB when accuracy first reached ``target`` (NaN if never)."""
        total = 0.0
        for row in self.rounds:
            total += row["uplink_bytes"]
            if row["round"] > 0 and row["accuracy"] >= target:
                return total / 1e6
        return math.nan


def _relevant(key: str, config: Mapping[str, Any]) -> bool:
    partitioner = config.get("partitioner")
    if key.startswith("dirichlet-"):
        return partitioner == "dirichlet"
    if key == "labels-per-client":
        return partitioner == "label-count"
    return True


#: keys that never tell two table rows apart: seeds are averaged, groups make tables.
_NOT_LABELS = {"seed", "results-dir", "run-name", "strategy", "checkpoint", *GROUP_KEYS}


def label_runs(results: list[RunResult]) -> None:
    """Label each run by its strategy plus every setting that varies across the experiment and
    concerns that run: common keys, and the keys of its own method (``lbi-mode`` labels LBI-FL
    rows, not FedAvg's), so no two settings of one method merge into one row."""
    from core.config import RunConfig
    from fl_app.methods import METHODS

    common = {key.name for key in RunConfig.config_keys()}
    keys = set().union(*(r.config for r in results)) - _NOT_LABELS
    varying = sorted(k for k in keys if len({json.dumps(r.config.get(k)) for r in results}) > 1)
    for result in results:
        strategy = str(result.config["strategy"])
        own = (
            {key.name for key in METHODS.get(strategy).settings.config_keys()}
            if strategy in METHODS
            else set()
        )
        shown = [k for k in varying if k in own] + [k for k in varying if k in common]
        result.label = " ".join([strategy, *(f"{k}={result.config.get(k)}" for k in shown)])


def collect(folder: Path) -> list[RunResult]:
    """Every completed run under ``folder``, labelled (``label_runs``)."""
    results = []
    for summary_path in sorted(folder.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        if not summary.get("completed"):
            continue
        rounds = read_rounds(summary_path.parent / "rounds.csv")
        results.append(RunResult(dict(summary["config"]), summary, rounds))
    if results:
        label_runs(results)
    return results


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaNs are ignored."""
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return math.nan, math.nan
    return float(np.mean(clean)), float(np.std(clean, ddof=1)) if len(clean) > 1 else 0.0


def table_rows(results: list[RunResult], target: float) -> dict[tuple[str, ...], list[dict]]:
    """Per group (dataset, model, partition): one row per method, aggregated over seeds."""
    grouped: dict[tuple[str, ...], dict[str, list[RunResult]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for result in results:
        grouped[result.group][result.method].append(result)
    tables = {}
    for group, methods in grouped.items():
        rows = []
        for method, runs in sorted(methods.items()):
            acc_mean, acc_std = mean_std(100 * r.summary["final_accuracy"] for r in runs)
            reach_mean, _ = mean_std(r.uplink_mb_to_reach(target) for r in runs)
            reached = sum(not math.isnan(r.uplink_mb_to_reach(target)) for r in runs)
            rows.append(
                {
                    "method": method,
                    "seeds": len(runs),
                    "accuracy_mean": acc_mean,
                    "accuracy_std": acc_std,
                    "uplink_bpp": float(np.mean([r.summary["uplink_bpp"] for r in runs])),
                    "downlink_bpp": float(np.mean([r.summary["downlink_bpp"] for r in runs])),
                    "total_gb": float(
                        np.mean(
                            [
                                (r.summary["uplink_bytes"] + r.summary["downlink_bytes"]) / 1e9
                                for r in runs
                            ]
                        )
                    ),
                    "uplink_mb_to_target": reach_mean,
                    "reached_target": reached,
                }
            )
        tables[group] = rows
    return tables


def markdown_table(rows: list[dict], target: float) -> str:
    header = (
        f"| method | accuracy % (mean ± std) | uplink bpp | downlink bpp | total GB | "
        f"uplink MB to {100 * target:.0f}% |\n|---|---|---|---|---|---|"
    )
    lines = [header]
    for row in rows:
        reach = (
            "not reached"
            if math.isnan(row["uplink_mb_to_target"])
            else f"{row['uplink_mb_to_target']:.2f} ({row['reached_target']}/{row['seeds']})"
        )
        lines.append(
            f"| {row['method']} | {row['accuracy_mean']:.2f} ± {row['accuracy_std']:.2f} | "
            f"{row['uplink_bpp']:.3f} | {row['downlink_bpp']:.3f} | {row['total_gb']:.4f} | "
            f"{reach} |"
        )
    return "\n".join(lines)


def plot_group(runs: list[RunResult], title: str, path: Path) -> None:
    """Accuracy vs round and vs cumulative uplink MB, one line per method, seed spread shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        by_method[run.method].append(run)
    figure, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, method_runs in sorted(by_method.items()):
        length = min(len(r.rounds) for r in method_runs)
        accuracy = np.array(
            [[row["accuracy"] * 100 for row in r.rounds[:length]] for r in method_runs]
        )
        uplink = np.array(
            [
                np.cumsum([row["uplink_bytes"] for row in r.rounds[:length]]) / 1e6
                for r in method_runs
            ]
        ).mean(axis=0)
        rounds = np.arange(length)
        mean, low, high = accuracy.mean(0), accuracy.min(0), accuracy.max(0)
        (line,) = by_round.plot(rounds, mean, label=method)
        by_round.fill_between(rounds, low, high, color=line.get_color(), alpha=0.2)
        by_bytes.plot(uplink, mean, label=method, color=line.get_color())
        by_bytes.fill_between(uplink, low, high, color=line.get_color(), alpha=0.2)
    by_round.set(xlabel="round", ylabel="test accuracy (%)", title="accuracy by round")
    by_bytes.set(
        xlabel="cumulative uplink (MB, all clients)",
        ylabel="test accuracy (%)",
        xscale="symlog",
        title="accuracy by uplink traffic",
    )
    by_round.legend(fontsize=8)
    by_round.grid(alpha=0.3)
    by_bytes.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(experiment: Experiment) -> Path:
    """``report.md``, ``table.csv`` and one PNG per group in the experiment folder."""
    results = collect(experiment.folder)
    if not results:
        raise RuntimeError(f"no completed runs under {experiment.folder}")
    tables = table_rows(results, experiment.target_accuracy)
    sections = [
        f"# {experiment.name}\n\nMeasured bpp = 8 x bytes on the wire / scalars of a "
        f"FedAvg message / client messages. Seeds: {experiment.seeds}.\n"
    ]
    with (experiment.folder / "table.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", *next(iter(tables.values()))[0].keys()])
        for group, rows in sorted(tables.items()):
            label = ", ".join(group)
            slug = re.sub(r"[^A-Za-z0-9=._-]+", "-", "_".join(group))
            plot_group(
                [r for r in results if r.group == group], label, experiment.folder / f"{slug}.png"
            )
            sections.append(
                f"## {label}\n\n{markdown_table(rows, experiment.target_accuracy)}"
                f"\n\n![{label}]({slug}.png)\n"
            )
            for row in rows:
                writer.writerow([label, *row.values()])
    report = experiment.folder / "report.md"
    report.write_text("\n".join(sections))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run a grid of FL runs and report on it")
    parser.add_argument("command", choices=("run", "report", "list"))
    parser.add_argument("experiment", type=Path)
    parser.add_argument(
        "--runner",
        choices=sorted(RUNNERS),
        default="flwr",
        help="flwr: every point through `flwr run` (default); inprocess: quick",
    )
    args = parser.parse_args(argv)
    experiment = load_experiment(args.experiment)
    if args.command == "list":
        for point in experiment.points():
            print(point.name)
        return 0
    if args.command == "run":
        try:
            run_experiment(experiment, RUNNERS[args.runner](experiment))
        except RuntimeError as err:
            print(f"experiment stopped: {err}", file=sys.stderr)
            return 1
    print(f"report: {write_report(experiment)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
