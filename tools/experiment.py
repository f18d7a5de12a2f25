"""Experiment harness: a grid of run configs x seeds -> runs -> paper-style tables and plots.

    python -m tools.experiment run experiments/digits.toml      # resumable; skips finished points
    python -m tools.experiment report experiments/digits.toml   # tables (Markdown, CSV) + PNGs
    python -m tools.experiment run FILE --runner inprocess       # no Ray: quick sweeps

An experiment file (TOML):

    name = "digits"                 # results go to <output>/<name>/<point>/
    output = "benchmarks/results"   # relative to the file's folder
    seeds = [1, 2, 3]
    target-accuracy = 0.95          # the table reports uplink MB needed to first reach it
    tail-rounds = 5                 # optional: tables add the mean accuracy of the last 5 rounds
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
    [tune]                          # optional: choose settings on a validation split
    metric = "final_val_accuracy"   # or "best_val_accuracy"; "val_accuracy" = final
    [tune.fedavg]                   # per strategy: every combination of these values
    learning-rate = [0.01, 0.05, 0.1]
    [tune.signsgd]
    signsgd-server-lr = [0.0005, 0.001, 0.002]

Every point runs through ``flwr run`` (``tools.launch``) with the offline settings; a point whose
``summary.json`` says ``completed`` is skipped, so an interrupted experiment picks up where it was.
A failed run stops the experiment with a non-zero exit.

Tuning: each point of a strategy with a ``[tune.<strategy>]`` table runs once per combination of
its values (they join the point's run config), so ``[fixed]`` must set ``validation-fraction`` > 0
(checked when the file loads): every run then scores its model on a validation split carved from
the training data (``fl_app.data``). The report chooses, per group and per row (every other axis
that varies), the combination with the best mean validation metric over seeds, and shows *that*
combination's test metrics; the test split never chooses anything. The default metric is the
final round's validation accuracy, because the main table reports final test accuracy: choosing
by the best round's would favour a curve's peak that the run does not end at. Every combination,
with its validation and test accuracy, is listed in the report's appendix (and ``tuning.csv``).
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.checkpoint import CHECKPOINT_NAME, load_checkpoint
from core.link import PROFILES
from core.plots import log_axis, plot_file_name, pyplot, round_axis, save_figure
from core.results import read_rounds
from tools.launch import toml_overrides
from tools.link_report import link_runs, plot_time, time_rows, time_table

#: ``[tune] metric`` -> the ``summary.json`` field it chooses by (higher is better).
TUNE_METRICS = {
    "final_val_accuracy": "final_val_accuracy",
    "val_accuracy": "final_val_accuracy",
    "best_val_accuracy": "best_val_accuracy",
}
#: the run-config key a tuned experiment must set above 0 in ``[fixed]``.
VALIDATION_KEY = "validation-fraction"

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
    #: strategy -> run-config key -> the values tried (``[tune.<strategy>]``).
    tune: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    #: the ``summary.json`` field settings are chosen by (``TUNE_METRICS``).
    tune_metric: str = "final_val_accuracy"
    #: link profiles the report models time to target on (``tools.link_report``); the message
    #: sizes it models them at (0: the run's own; N: scaled to N parameters).
    link_profiles: list[str] = field(default_factory=list)
    link_scale_params: list[int] = field(default_factory=lambda: [0])
    #: > 0: the tables add each row's accuracy averaged over its runs' last N rounds (a steadier
    #: figure than the final round's where accuracy swings from round to round, e.g. non-IID).
    tail_rounds: int = 0

    @property
    def folder(self) -> Path:
        return self.output / self.name

    def tune_settings(self, strategy: str) -> list[dict[str, Any]]:
        """Every combination of ``strategy``'s tuned values (one empty one when untuned)."""
        grid = self.tune.get(strategy, {})
        return [
            dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())
        ]

    def points(self) -> list[Point]:
        """Cartesian product of the axes, times the tuned values of the point's strategy, times
        the seeds; seed-major, so an interrupted experiment has whole tables for its first
        seeds."""
        points = []
        for seed in self.seeds:
            for combo in itertools.product(*self.axes) if self.axes else [()]:
                merged: dict[str, Any] = dict(self.fixed)
                for setting in combo:
                    merged.update(setting)
                for tuned in self.tune_settings(strategy_of(merged)):
                    config = {**merged, **tuned, "seed": seed}
                    points.append(Point(point_name(config, self.fixed), config))
        names = [p.name for p in points]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: two grid points share a name; make the grid distinct")
        return points


def run_config_default(key: str) -> Any:
    """The app's default of run-config ``key`` (imported here: ``core.config`` pulls in the
    codecs, which listing a grid does not need)."""
    from core.config import RunConfig

    defaults = {k.name: k.default for k in RunConfig.config_keys()}
    if key not in defaults:
        raise KeyError(f"no run-config key {key!r}")
    return defaults[key]


def strategy_of(config: Mapping[str, Any]) -> str:
    """The strategy a run config runs (the app's default when the config does not say)."""
    return str(config.get("strategy", run_config_default("strategy")))


def _parse_tune(
    path: Path, table: Mapping[str, Any], fixed: Mapping[str, Any], axes: list[list[dict]]
) -> tuple[dict[str, dict[str, list[Any]]], str]:
    """The ``[tune]`` table: (strategy -> key -> values, metric field), checked so a mistake
    stops the experiment before its first run, not after hours of runs nothing can choose
    between."""
    table = dict(table)
    name = str(table.pop("metric", "final_val_accuracy"))
    if name not in TUNE_METRICS:
        raise ValueError(f"{path}: tune.metric must be one of {sorted(TUNE_METRICS)}, got {name!r}")
    grid_keys = {key for axis in axes for setting in axis for key in setting}
    tune: dict[str, dict[str, list[Any]]] = {}
    for strategy, keys in table.items():
        if not isinstance(keys, dict) or not keys:
            raise ValueError(f"{path}: tune.{strategy} must be a table of key = [values]")
        for key, values in keys.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{path}: tune.{strategy}.{key} must be a non-empty list")
            if any(isinstance(v, dict | list) for v in values):
                raise ValueError(f"{path}: tune.{strategy}.{key} must list plain values")
            if len({json.dumps(v) for v in values}) != len(values):
                raise ValueError(f"{path}: tune.{strategy}.{key} lists a value twice")
            if key in ("strategy", "seed", VALIDATION_KEY) or key in grid_keys:
                raise ValueError(
                    f"{path}: tune.{strategy}.{key}: {key!r} is a grid axis or not tunable; "
                    "a key is either tuned (chosen on validation) or compared (a grid axis)"
                )
        tune[str(strategy)] = {str(k): list(v) for k, v in keys.items()}
    if tune:
        fraction = fixed.get(VALIDATION_KEY, 0)
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or fraction <= 0:
            raise ValueError(
                f"{path}: [tune] needs {VALIDATION_KEY} > 0 in [fixed] (e.g. 0.1): settings are "
                f"chosen on the validation split, never on the test split; got {fraction!r}"
            )
    return tune, TUNE_METRICS[name]


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
        "tune",
        "link-profiles",
        "link-scale-params",
        "tail-rounds",
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
    fixed = dict(data.get("fixed", {}))
    tune, metric = _parse_tune(path, data.get("tune", {}), fixed, axes)
    experiment = Experiment(
        name=str(data.get("name", path.stem)),
        output=output if output.is_absolute() else (path.parent / output).resolve(),
        seeds=[int(s) for s in data.get("seeds", [42])],
        fixed=fixed,
        axes=axes,
        federation=dict(data.get("federation", {})),
        target_accuracy=float(data.get("target-accuracy", 0.9)),
        requires=str(data.get("requires", "cpu")),
        tune=tune,
        tune_metric=metric,
        link_profiles=[str(p) for p in data.get("link-profiles", [])],
        link_scale_params=[int(n) for n in data.get("link-scale-params", [0])],
        tail_rounds=int(data.get("tail-rounds", 0)),
    )
    if experiment.tail_rounds < 0:
        raise ValueError(f"{path}: tail-rounds must be >= 0, got {experiment.tail_rounds}")
    if stray := sorted(set(experiment.link_profiles) - set(PROFILES)):
        raise ValueError(f"{path}: unknown link-profiles {stray}; valid: {', '.join(PROFILES)}")
    strategies = {strategy_of(point.config) for point in experiment.points()}
    if stray := sorted(set(tune) - strategies):
        raise ValueError(
            f"{path}: [tune] names strategies no point runs: {stray}; the grid runs "
            f"{sorted(strategies)}"
        )
    return experiment


def point_name(config: Mapping[str, Any], fixed: Mapping[str, Any]) -> str:
    """Folder name from the keys that vary (strategy first, seed last)."""
    varying = {k: v for k, v in config.items() if k not in fixed or fixed[k] != v}
    ordered = sorted(varying, key=lambda k: (k != "strategy", k == "seed", k))
    text = "_".join(f"{k}={varying[k]}" for k in ordered)
    return re.sub(r"[^A-Za-z0-9=._-]+", "-", text)


def is_finished(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and bool(json.loads(summary.read_text()).get("completed"))


Runner = Callable[[Point, Path], None]


def flwr_runner(experiment: Experiment) -> Runner:
    """Run a point with ``flwr run`` on a local simulation; raise if the run did not complete."""
    from tools.launch import launch

    federation = toml_overrides(experiment.federation)

    def run(point: Point, folder: Path) -> None:
        overrides = {**point.config, "results-dir": str(folder), "run-name": point.name}
        run_config = toml_overrides(overrides)
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


def select_points(points: list[Point], where: Sequence[str]) -> list[Point]:
    """The points whose run config matches every ``KEY=VALUE`` of ``where`` (the value as the
    experiment file writes it: ``partitioner=dirichlet``, ``fedbif-bits=3``, ``seed=1``)."""
    wanted: dict[str, str] = {}
    for condition in where:
        key, sep, value = condition.partition("=")
        if not sep or not key:
            raise ValueError(f"--where takes KEY=VALUE, got {condition!r}")
        wanted[key] = value
    known = set().union(*(p.config for p in points)) if points else set()
    if stray := sorted(set(wanted) - known):
        raise ValueError(f"--where names keys no point sets: {stray}; they set {sorted(known)}")

    def text(value: Any) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    return [p for p in points if all(text(p.config.get(k)) == v for k, v in wanted.items())]


def resumable(point: Point, run_dir: Path, echo: Callable[[str], None]) -> Point:
    """``point`` with ``resume-from`` its checkpoint when an interrupted run left one with rounds
    still to run; a checkpoint that holds every round (the run stopped between its last round
    and its summary) or cannot be read is removed and the point starts afresh."""
    checkpoint = run_dir / CHECKPOINT_NAME
    if not checkpoint.exists():
        return point
    try:
        done = int(load_checkpoint(checkpoint)[1]["round"])
    except (OSError, ValueError, KeyError) as err:
        echo(f"{point.name}: unreadable checkpoint ({err}); starting afresh")
        checkpoint.unlink()
        return point
    rounds = int(point.config.get("num-server-rounds", run_config_default("num-server-rounds")))
    if done >= rounds:
        echo(f"{point.name}: checkpoint holds all {rounds} rounds but no summary; starting afresh")
        checkpoint.unlink()
        return point
    echo(f"{point.name}: resuming from {checkpoint} after round {done}")
    return Point(point.name, {**point.config, "resume-from": str(checkpoint)})


def check_points(points: Sequence[Point]) -> None:
    """Validate every point's run config before the first one runs: a typo in the file fails
    in a second with the point and the key named (``ConfigError``), not hours into a grid."""
    from core.config import ConfigError
    from fl_app.methods import load_config

    for point in points:
        try:
            load_config(dict(point.config))
        except ConfigError as err:
            raise ConfigError(f"point {point.name}: {err}") from None


def run_experiment(
    experiment: Experiment,
    runner: Runner | None = None,
    echo: Callable[[str], None] = print,
    where: Sequence[str] = (),
) -> int:
    """Run every unfinished point; returns how many ran. Raises on the first failed run.

    A point whose folder holds a checkpoint (``checkpoint = true``, the app's default) but no
    completed summary was interrupted: it continues from its last finished round
    (``resume-from``), so long runs progress across sessions instead of starting over."""
    runner = runner or flwr_runner(experiment)
    experiment.folder.mkdir(parents=True, exist_ok=True)
    points = select_points(experiment.points(), where)
    todo = [p for p in points if not is_finished(experiment.folder / p.name)]
    check_points(todo)
    echo(
        f"{experiment.name}: {len(points)} points, {len(points) - len(todo)} done, "
        f"{len(todo)} to run"
    )
    started = time.monotonic()
    for index, point in enumerate(todo, start=1):
        if is_finished(experiment.folder / point.name):  # another process of the grid ran it
            echo(f"[{len(points) - len(todo) + index}/{len(points)}] {point.name} already done")
            continue
        point = resumable(point, experiment.folder / point.name, echo)
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
    #: the row label: the strategy and its settings that vary in the experiment (tuned ones
    #: excepted: those are chosen, not compared).
    label: str = ""
    #: the run's tuned values, ``(key, value)`` in ``[tune.<strategy>]`` order (empty: untuned).
    setting: tuple[tuple[str, Any], ...] = ()
    #: the run's results folder (``clients.csv`` for the link model).
    run_dir: Path | None = None

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

    def tail_accuracy(self, rounds: int) -> float:
        """Mean test accuracy (0..1) of the last ``rounds`` recorded rounds (round 0, the
        initial model, excluded); NaN when ``rounds`` is 0 or nothing was recorded."""
        trained = [float(r["accuracy"]) for r in self.rounds if r.get("round", 1) > 0]
        if rounds <= 0 or not trained:
            return math.nan
        return float(np.mean(trained[-rounds:]))

    def validation(self, metric: str) -> float:
        """The run's validation metric (a ``summary.json`` field); NaN without a validation
        split (``null`` there)."""
        value = self.summary.get(metric)
        return math.nan if value is None else float(value)

    def mb_to_reach(self, target: float, columns: tuple[str, ...]) -> float:
        """Cumulative MB of the byte ``columns`` when test accuracy first reached ``target``
        (NaN if never; the initial model's round 0 does not count)."""
        total = 0.0
        for row in self.rounds:
            total += sum(row.get(column, 0.0) for column in columns)
            if row["round"] > 0 and row["accuracy"] >= target:
                return total / 1e6
        return math.nan

    def uplink_mb_to_reach(self, target: float) -> float:
        """Cumulative uplink MB when accuracy first reached ``target`` (NaN if never)."""
        return self.mb_to_reach(target, ("uplink_bytes",))

    def total_mb_to_reach(self, target: float) -> float:
        """Cumulative uplink + downlink MB when accuracy first reached ``target``: what a
        method costs both ways, since some compress one direction only (NaN if never)."""
        return self.mb_to_reach(target, ("uplink_bytes", "downlink_bytes"))


def _relevant(key: str, config: Mapping[str, Any]) -> bool:
    partitioner = config.get("partitioner")
    if key.startswith("dirichlet-"):
        return partitioner == "dirichlet"
    if key == "labels-per-client":
        return partitioner == "label-count"
    return True


#: keys that never tell two table rows apart: seeds are averaged, groups make tables.
_NOT_LABELS = {
    "seed",
    "results-dir",
    "run-name",
    "strategy",
    "checkpoint",
    "resume-from",
    *GROUP_KEYS,
}


def label_runs(
    results: list[RunResult], tune: Mapping[str, Mapping[str, Any]] | None = None
) -> None:
    """Label each run by its strategy plus every setting that varies across the experiment and
    concerns that run: common keys, and the keys of its own method (``lbi-mode`` labels LBI-FL
    rows, not FedAvg's), so no two settings of one method merge into one row.

    A key tuned for a run's strategy (``tune``) is left out of its label and goes to its
    ``setting`` instead: the report picks one setting per row, it does not compare them. Nor
    does tuning make a key look varying for the runs that do not tune it.
    """
    from core.config import LEGACY_VALUES, RunConfig
    from fl_app.methods import METHODS

    tune = tune or {}

    def tuned(result: RunResult) -> Mapping[str, Any]:
        return tune.get(str(result.config.get("strategy")), {})

    common_defaults = {key.name: key.default for key in RunConfig.config_keys()}
    common = set(common_defaults)
    keys = set().union(*(r.config for r in results)) - _NOT_LABELS
    # A key some runs lack was added to the app after them: those runs ran at the old behaviour,
    # its default or, where the default now turns a stage on, LEGACY_VALUES (a resumed grid mixes
    # runs of two code versions).
    common_defaults.update(LEGACY_VALUES)
    for result in results:
        strategy = str(result.config.get("strategy"))
        defaults = dict(common_defaults)
        if strategy in METHODS:
            defaults.update(
                {key.name: key.default for key in METHODS.get(strategy).settings.config_keys()}
            )
        for key in keys - set(result.config):
            if key in defaults:
                result.config[key] = defaults[key]
    varying = sorted(
        k
        for k in keys
        if len({json.dumps(r.config[k]) for r in results if k in r.config and k not in tuned(r)})
        > 1
        and (k not in PER_METHOD_KEYS or _varies_within_a_strategy(results, k))
    )
    for result in results:
        strategy = str(result.config["strategy"])
        own = (
            {key.name for key in METHODS.get(strategy).settings.config_keys()}
            if strategy in METHODS
            else set()
        )
        hidden = tuned(result)
        shown = [k for k in varying if k in own and k not in hidden and k in result.config]
        shown += [k for k in varying if k in common and k not in hidden and k in result.config]
        result.label = " ".join([strategy, *(f"{k}={result.config.get(k)}" for k in shown)])
        result.setting = tuple((k, result.config.get(k)) for k in hidden)


#: keys whose ``auto`` each method resolves for itself (``CommunicationStrategy.resolve_wire``):
#: they differ from method to method in every multi-method grid, so they label a row only where
#: they differ between runs of one strategy.
PER_METHOD_KEYS = frozenset({"entropy", "downlink-reference", "uplink-reference"})


def _varies_within_a_strategy(results: Sequence[RunResult], key: str) -> bool:
    values: dict[str, set[str]] = defaultdict(set)
    for result in results:
        if key in result.config:
            values[str(result.config.get("strategy"))].add(json.dumps(result.config[key]))
    return any(len(seen) > 1 for seen in values.values())


def collect(folder: Path, tune: Mapping[str, Mapping[str, Any]] | None = None) -> list[RunResult]:
    """Every completed run under ``folder``, labelled (``label_runs``)."""
    results = []
    for summary_path in sorted(folder.glob("*/summary.json")):
        summary = json.loads(summary_path.read_text())
        if not summary.get("completed"):
            continue
        rounds = read_rounds(summary_path.parent / "rounds.csv")
        results.append(
            RunResult(dict(summary["config"]), summary, rounds, run_dir=summary_path.parent)
        )
    if results:
        label_runs(results, tune)
    return results


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaNs are ignored."""
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return math.nan, math.nan
    return float(np.mean(clean)), float(np.std(clean, ddof=1)) if len(clean) > 1 else 0.0


def setting_text(setting: Iterable[tuple[str, Any]]) -> str:
    """``learning-rate=0.05 momentum=0.9``, or ``-`` for an untuned row."""
    return " ".join(f"{k}={v}" for k, v in setting) or "-"


@dataclass
class Candidate:
    """One tuned setting of one row of one group, with its runs over seeds."""

    group: tuple[str, ...]
    method: str
    setting: tuple[tuple[str, Any], ...]
    runs: list[RunResult]
    validation_mean: float
    validation_std: float
    chosen: bool = False


def _value_order(value: Any) -> tuple[int, float, str]:
    """Sort key of a tuned value: numbers by size, anything else after them by text."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, json.dumps(value))


def choose_settings(results: list[RunResult], metric: str) -> list[Candidate]:
    """Every (group, row, setting) of ``results`` with its mean validation ``metric`` over
    seeds; per (group, row), the best one is ``chosen``.

    Only the validation metric is read here: test accuracy never takes part in the choice (a
    tie goes to the smaller values, in ``[tune]`` key order). A row with one setting (untuned,
    or a grid of one value) takes it as it is; a row with several and no validation metric
    cannot be chosen and raises ``ValueError``.
    """
    runs: dict[tuple, list[RunResult]] = defaultdict(list)
    for result in results:
        runs[(result.group, result.method, result.setting)].append(result)
    rows: dict[tuple[tuple[str, ...], str], list[Candidate]] = defaultdict(list)
    for (group, method, setting), members in runs.items():
        mean, std = mean_std(r.validation(metric) for r in members)
        rows[(group, method)].append(Candidate(group, method, setting, members, mean, std))
    candidates = []
    for (group, method), options in sorted(rows.items()):
        options.sort(key=lambda c: [_value_order(v) for _, v in c.setting])
        scored = [c for c in options if not math.isnan(c.validation_mean)]
        if len(options) == 1:
            options[0].chosen = True
        elif not scored:
            raise ValueError(
                f"{method} ({', '.join(group)}): {len(options)} tuned settings but no "
                f"{metric} in their summaries; tuned runs need {VALIDATION_KEY} > 0"
            )
        else:
            # max() keeps the first of equal values: the smallest setting wins a tie.
            max(scored, key=lambda c: c.validation_mean).chosen = True
        candidates.extend(options)
    return candidates


def table_rows(
    results: list[RunResult], target: float, metric: str = "final_val_accuracy", tail: int = 0
) -> dict[tuple[str, ...], list[dict]]:
    """Per group (dataset, model, partition): one row per method, aggregated over seeds
    (``tail`` > 0: also the accuracy over each run's last ``tail`` rounds).

    With tuning, pass only the chosen settings' runs (``choose_settings``): a row aggregates
    every run it is given.
    """
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
            tail_mean, tail_std = mean_std(100 * r.tail_accuracy(tail) for r in runs)
            val_mean, val_std = mean_std(100 * r.validation(metric) for r in runs)
            reach_mean, _ = mean_std(r.uplink_mb_to_reach(target) for r in runs)
            total_reach_mean, _ = mean_std(r.total_mb_to_reach(target) for r in runs)
            reached = sum(not math.isnan(r.uplink_mb_to_reach(target)) for r in runs)
            rows.append(
                {
                    "method": method,
                    "tuned": " / ".join(sorted({setting_text(r.setting) for r in runs})),
                    "seeds": len(runs),
                    "validation_mean": val_mean,
                    "validation_std": val_std,
                    "accuracy_mean": acc_mean,
                    "accuracy_std": acc_std,
                    "tail_accuracy_mean": tail_mean,
                    "tail_accuracy_std": tail_std,
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
                    "total_mb_to_target": total_reach_mean,
                    "reached_target": reached,
                }
            )
        tables[group] = rows
    return tables


def _reach_text(mb: float, row: dict) -> str:
    if math.isnan(mb):
        return "not reached"
    return f"{mb:.2f} ({row['reached_target']}/{row['seeds']})"


def _pm(mean: float, std: float) -> str:
    return "-" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def markdown_table(
    rows: list[dict],
    target: float,
    *,
    tuned: bool = False,
    validation: bool = False,
    tail: int = 0,
) -> str:
    """The main table of a group; ``tuned`` adds the chosen setting, ``validation`` its mean
    validation accuracy (the figure it was chosen by)."""
    percent = f"{100 * target:.0f}%"
    columns = ["method"]
    columns += ["tuned setting"] if tuned else []
    columns += ["validation % (mean ± std)"] if validation else []
    columns += [
        "test accuracy % (mean ± std)",
        *([f"last {tail} rounds % (mean ± std)"] if tail > 0 else []),
        "uplink bpp",
        "downlink bpp",
        "total GB",
        f"uplink MB to {percent}",
        f"total MB to {percent}",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row["method"]]
        cells += [row["tuned"]] if tuned else []
        cells += [_pm(row["validation_mean"], row["validation_std"])] if validation else []
        cells += [
            _pm(row["accuracy_mean"], row["accuracy_std"]),
            *([_pm(row["tail_accuracy_mean"], row["tail_accuracy_std"])] if tail > 0 else []),
            f"{row['uplink_bpp']:.3f}",
            f"{row['downlink_bpp']:.3f}",
            f"{row['total_gb']:.4f}",
            _reach_text(row["uplink_mb_to_target"], row),
            _reach_text(row["total_mb_to_target"], row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tuning_rows(candidates: list[Candidate]) -> list[dict]:
    """The appendix rows: every tuned setting with its validation and test accuracy."""
    rows = []
    for candidate in candidates:
        if not candidate.setting:
            continue
        test_mean, test_std = mean_std(100 * r.summary["final_accuracy"] for r in candidate.runs)
        rows.append(
            {
                "group": ", ".join(candidate.group),
                "method": candidate.method,
                "setting": setting_text(candidate.setting),
                "seeds": len(candidate.runs),
                "validation_mean": 100 * candidate.validation_mean,
                "validation_std": 100 * candidate.validation_std,
                "accuracy_mean": test_mean,
                "accuracy_std": test_std,
                "chosen": candidate.chosen,
            }
        )
    return rows


def tuning_table(rows: list[dict]) -> str:
    lines = [
        "| method | setting | seeds | validation % (mean ± std) | test accuracy % (mean ± std) "
        "| chosen |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['setting']} | {row['seeds']} | "
            f"{_pm(row['validation_mean'], row['validation_std'])} | "
            f"{_pm(row['accuracy_mean'], row['accuracy_std'])} | "
            f"{'**yes**' if row['chosen'] else ''} |"
        )
    return "\n".join(lines)


@dataclass
class _Curve:
    """One method's curves in a group: test accuracy per seed, mean cumulative MB."""

    accuracy: np.ndarray  # (seeds, rounds), percent
    uplink_mb: np.ndarray  # (rounds,)
    total_mb: np.ndarray  # (rounds,)


def _cumulative_mb(runs: list[RunResult], length: int, columns: tuple[str, ...]) -> np.ndarray:
    """Mean over ``runs`` of the cumulative MB of the byte ``columns``, first ``length`` rounds."""
    return np.array(
        [
            np.cumsum([sum(row.get(c, 0.0) for c in columns) for row in r.rounds[:length]]) / 1e6
            for r in runs
        ]
    ).mean(axis=0)


def _curves(runs: list[RunResult]) -> dict[str, _Curve]:
    by_method: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        by_method[run.method].append(run)
    curves = {}
    for method, method_runs in sorted(by_method.items()):
        length = min(len(r.rounds) for r in method_runs)
        curves[method] = _Curve(
            np.array([[row["accuracy"] * 100 for row in r.rounds[:length]] for r in method_runs]),
            _cumulative_mb(method_runs, length, ("uplink_bytes",)),
            _cumulative_mb(method_runs, length, ("uplink_bytes", "downlink_bytes")),
        )
    return curves


def plot_group(runs: list[RunResult], title: str, path: Path) -> None:
    """Accuracy vs round and vs cumulative uplink MB, one line per method, seed spread shaded."""
    plt = pyplot()
    figure, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, curve in _curves(runs).items():
        rounds = np.arange(curve.accuracy.shape[1])
        acc = curve.accuracy
        mean, low, high = acc.mean(0), acc.min(0), acc.max(0)
        (line,) = by_round.plot(rounds, mean, label=method)
        by_round.fill_between(rounds, low, high, color=line.get_color(), alpha=0.2)
        by_bytes.plot(curve.uplink_mb, mean, label=method, color=line.get_color())
        by_bytes.fill_between(curve.uplink_mb, low, high, color=line.get_color(), alpha=0.2)
    round_axis(by_round, xlabel="round", ylabel="test accuracy (%)", title="accuracy by round")
    log_axis(
        by_bytes,
        xlabel="cumulative uplink (MB, all clients)",
        ylabel="test accuracy (%)",
        title="accuracy by uplink traffic",
    )
    by_round.legend(fontsize=8)
    by_round.grid(alpha=0.3)
    by_bytes.grid(alpha=0.3)
    save_figure(figure, path, title, dpi=110)


def plot_group_total(runs: list[RunResult], title: str, path: Path) -> None:
    """Accuracy vs cumulative uplink + downlink MB, one line per method, seed spread shaded:
    the cost both ways, where a method with a compressed uplink and an fp32 downlink stands."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for method, curve in _curves(runs).items():
        acc = curve.accuracy
        (line,) = axis.plot(curve.total_mb, acc.mean(0), label=method)
        axis.fill_between(curve.total_mb, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2)
    log_axis(
        axis,
        xlabel="cumulative uplink + downlink (MB, all clients)",
        ylabel="test accuracy (%)",
        title="accuracy by total traffic",
    )
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    save_figure(figure, path, title, dpi=110)


def link_section(experiment: Experiment, runs: list[RunResult], label: str, slug: str) -> str:
    """Time to the target accuracy on the experiment's modelled links (``tools.link_report``),
    once per message size in ``link-scale-params``; the plot at the runs' own sizes."""
    profiles, target = experiment.link_profiles, experiment.target_accuracy
    parts = [
        f"### Time to {100 * target:.0f}% on modelled links\n\n"
        "Modelled from each run's `clients.csv` (`core.link`: 1.5 RTT + bytes down / down rate "
        "+ the client's measured training seconds + bytes up / up rate, the round ending with "
        "its slowest client; no deadline), mean over the seeds that reached the target; "
        "fastest method per profile in bold.\n"
    ]
    for scale in experiment.link_scale_params:
        link = link_runs(
            ((r.method, r.group, r.run_dir, r.rounds, r.summary) for r in runs if r.run_dir),
            profiles,
            scale,
        )
        if not link:
            return parts[0] + "\n(no run of this group recorded clients.csv)\n"
        size = "the runs' own messages" if not scale else f"messages scaled to {scale:,} parameters"
        (rows,) = time_rows(link, profiles, target).values()
        parts.append(f"{size}:\n\n{time_table(rows, profiles, target)}\n")
        if not scale:
            plot_time(link, profiles, label, experiment.folder / f"{slug}-time.png")
            parts.append(f"![{label}, by modelled time]({slug}-time.png)\n")
    return "\n".join(parts)


def write_report(experiment: Experiment) -> Path:
    """``report.md``, ``table.csv`` and two PNGs per group (by uplink, by total traffic) in the
    experiment folder; with ``[tune]``, each row at its setting chosen on validation, and the
    whole grid in an appendix and ``tuning.csv``."""
    results = collect(experiment.folder, experiment.tune)
    if not results:
        raise RuntimeError(f"no completed runs under {experiment.folder}")
    metric = experiment.tune_metric
    candidates = choose_settings(results, metric)
    selected = [run for c in candidates if c.chosen for run in c.runs]
    tables = table_rows(selected, experiment.target_accuracy, metric, experiment.tail_rounds)
    tuned = bool(experiment.tune)
    validation = any(not math.isnan(row["validation_mean"]) for t in tables.values() for row in t)
    tail_note = (
        f" (and, where shown, the mean over each run's last {experiment.tail_rounds} rounds)"
        if experiment.tail_rounds
        else ""
    )
    head = (
        f"# {experiment.name}\n\nMeasured bpp = 8 x bytes on the wire / scalars of a "
        f"FedAvg message / client messages. Seeds: {experiment.seeds}. Test accuracy is the "
        f"final round's{tail_note}; MB to a target are cumulative until the round that first "
        f"reached it (uplink, and uplink + downlink).\n"
    )
    if tuned:
        head += (
            f"\nTuned: each row shows the setting with the best mean `{metric}` over seeds on "
            f"the validation split ({VALIDATION_KEY} = {experiment.fixed.get(VALIDATION_KEY)} "
            f"of the training data, carved before partitioning); the test split chose nothing. "
            f"Every setting tried: appendix.\n"
        )
    sections = [head]
    with (experiment.folder / "table.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["group", *next(iter(tables.values()))[0].keys()])
        for group, rows in sorted(tables.items()):
            label = ", ".join(group)
            slug = plot_file_name(group)
            runs = [r for r in selected if r.group == group]
            plot_group(runs, label, experiment.folder / f"{slug}.png")
            plot_group_total(runs, label, experiment.folder / f"{slug}-total.png")
            table = markdown_table(
                rows,
                experiment.target_accuracy,
                tuned=tuned,
                validation=validation,
                tail=experiment.tail_rounds,
            )
            sections.append(
                f"## {label}\n\n{table}\n\n![{label}]({slug}.png)\n\n"
                f"![{label}, by total traffic]({slug}-total.png)\n"
            )
            for row in rows:
                writer.writerow([label, *row.values()])
            if experiment.link_profiles:
                sections.append(link_section(experiment, runs, label, slug))
    grid = tuning_rows(candidates)
    if grid:
        sections.append(
            "## Appendix: tuning grid\n\nEvery tuned setting, mean ± std over seeds; "
            "**yes** marks the one each row above shows (highest validation).\n"
        )
        with (experiment.folder / "tuning.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(grid[0].keys())
            for row in grid:
                writer.writerow(row.values())
        for group in sorted({row["group"] for row in grid}):
            rows = [row for row in grid if row["group"] == group]
            sections.append(f"### {group}\n\n{tuning_table(rows)}\n")
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
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run or list only the points whose run config has KEY=VALUE (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        experiment = load_experiment(args.experiment)
        selected = select_points(experiment.points(), args.where)
    except (OSError, ValueError) as err:  # tomllib's and ConfigError are ValueErrors
        parser.error(str(err))
    if args.command == "list":
        for point in selected:
            print(point.name)
        return 0
    if args.command == "run":
        from core.settings import ConfigError

        try:
            run_experiment(experiment, RUNNERS[args.runner](experiment), where=args.where)
        except ConfigError as err:  # a bad key or value, a clobber or a resume refused
            print(f"experiment not run: {err}", file=sys.stderr)
            return 2
        except RuntimeError as err:
            print(f"experiment stopped: {err}", file=sys.stderr)
            return 1
    print(f"report: {write_report(experiment)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
