"""Experiment harness: grid expansion, resumption, table aggregation, plots, shipped files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from core.config import parse_run_config
from core.results import ResultsWriter
from fl_app.methods import all_config_keys
from tools.experiment import (
    Experiment,
    Point,
    collect,
    load_experiment,
    run_experiment,
    table_rows,
    toml_value,
    write_report,
)

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"

EXAMPLE = """
name = "demo"
output = "out"
seeds = [1, 2, 3]
target-accuracy = 0.5
[fixed]
dataset = "digits"
num-server-rounds = 2
[federation]
num-supernodes = 3
[grid]
strategy = ["fedavg", "fedbif"]
[[grid.setting]]
partitioner = "iid"
[[grid.setting]]
partitioner = "dirichlet"
dirichlet-alpha = 0.1
"""


def demo(tmp_path) -> Experiment:
    path = tmp_path / "demo.toml"
    path.write_text(EXAMPLE)
    return load_experiment(path)


def fake_run(point: Point, folder: Path, accuracy: list[float], uplink: int = 1000) -> None:
    writer = ResultsWriter(folder / point.name)
    for index, acc in enumerate(accuracy):
        writer.write_round(
            {
                "round": index,
                "accuracy": acc,
                "loss": 1 - acc,
                "train_loss": 0.0,
                "uplink_bytes": uplink if index else 0,
                "downlink_bytes": 2 * uplink if index else 0,
                "uplink_bpp": 1.0,
                "downlink_bpp": 2.0,
                "clients": 3,
                "failures": 0,
                "rejected": 0,
                "seconds": 0.1,
                "clipped": 0,
                "aggregate_refused": 0,
                "total_bytes": 3 * uplink if index else 0,
                "total_bpp": 3.0,
            }
        )
    writer.write_summary(
        {
            "completed": True,
            "config": point.config,
            "final_accuracy": accuracy[-1],
            "uplink_bpp": 1.0,
            "downlink_bpp": 2.0,
            "uplink_bytes": uplink * (len(accuracy) - 1),
            "downlink_bytes": 2 * uplink * (len(accuracy) - 1),
        }
    )


def test_grid_expansion(tmp_path):
    experiment = demo(tmp_path)
    points = experiment.points()
    assert len(points) == 2 * 2 * 3
    assert len({p.name for p in points}) == len(points)
    first = points[0]
    assert first.config["dataset"] == "digits" and first.config["num-server-rounds"] == 2
    assert first.name.startswith("strategy=fedavg") and first.name.endswith("seed=1")
    alphas = {p.config.get("dirichlet-alpha") for p in points}
    assert alphas == {None, 0.1}
    assert experiment.folder == tmp_path / "out" / "demo"


def test_resumption_skips_finished_points_and_failures_stop(tmp_path):
    experiment = demo(tmp_path)
    calls: list[str] = []

    def runner(point: Point, folder: Path) -> None:
        calls.append(point.name)
        fake_run(point, folder, [0.1, 0.6])

    assert run_experiment(experiment, runner, echo=lambda _: None) == 12
    assert run_experiment(experiment, runner, echo=lambda _: None) == 0
    assert len(calls) == 12
    # An unfinished point (no completed summary) runs again.
    victim = experiment.points()[4]
    summary = experiment.folder / victim.name / "summary.json"
    summary.write_text(json.dumps({"completed": False}))
    assert run_experiment(experiment, runner, echo=lambda _: None) == 1
    assert calls[-1] == victim.name

    summary.write_text(json.dumps({"completed": False}))

    def failing(point: Point, folder: Path) -> None:
        raise RuntimeError("flwr run failed")

    with pytest.raises(RuntimeError, match="failed"):
        run_experiment(experiment, failing, echo=lambda _: None)


def test_table_mean_std_and_uplink_to_target(tmp_path):
    experiment = demo(tmp_path)
    finals = {1: 0.80, 2: 0.90, 3: 0.70}
    for point in experiment.points():
        seed = point.config["seed"]
        curve = (
            [0.1, 0.4, finals[seed]] if point.config["strategy"] == "fedavg" else [0.1, 0.2, 0.3]
        )
        fake_run(point, experiment.folder, curve, uplink=2_000_000)
    tables = table_rows(collect(experiment.folder), target=0.5)
    assert len(tables) == 2
    iid = tables[("dataset=digits", "partitioner=iid")]
    fedavg = next(row for row in iid if row["method"] == "fedavg")
    assert fedavg["seeds"] == 3
    assert fedavg["accuracy_mean"] == pytest.approx(80.0)
    assert fedavg["accuracy_std"] == pytest.approx(10.0)  # sample std of 70, 80, 90
    assert fedavg["uplink_mb_to_target"] == pytest.approx(4.0)  # reached in round 2
    assert fedavg["total_gb"] == pytest.approx(2 * 6e6 / 1e9)
    fedbif = next(row for row in iid if row["method"] == "fedbif")
    assert math.isnan(fedbif["uplink_mb_to_target"]) and fedbif["reached_target"] == 0

    report = write_report(experiment)
    text = report.read_text()
    assert "80.00 ± 10.00" in text and "not reached" in text
    pngs = list(experiment.folder.glob("*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 5000 for p in pngs)
    assert (experiment.folder / "table.csv").read_text().count("\n") == 1 + 4


def test_toml_values_for_run_config():
    assert toml_value("fedavg") == '"fedavg"'
    assert toml_value(True) == "true" and toml_value(0.5) == "0.5" and toml_value(3) == "3"


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_experiment_files_are_valid(path):
    experiment = load_experiment(path)
    points = experiment.points()
    assert points
    keys = all_config_keys()
    for point in points:
        parse_run_config(point.config, keys)  # raises on an unknown key or a bad value


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_model_of_every_file_builds_on_its_dataset(path):
    import torch

    from fl_app.data import DATASETS
    from fl_app.models import build_model

    pairs = {
        (p.config.get("model", "digits-cnn-bn"), p.config.get("dataset", "digits"))
        for p in load_experiment(path).points()
    }
    for model_name, dataset in sorted(pairs):
        spec = DATASETS.get(dataset)
        model = build_model(
            model_name,
            in_channels=spec.in_channels,
            num_classes=spec.num_classes,
            image_size=spec.image_size,
        ).eval()
        with torch.no_grad():
            out = model(torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size))
        assert out.shape == (2, spec.num_classes), (model_name, dataset)


def test_rows_are_labelled_by_every_setting_that_varies_for_that_method():
    from tools.experiment import RunResult, label_runs

    def run(**config: object) -> RunResult:
        defaults = {"fedbif-bits": 4, "lbi-mode": "agent", "learning-rate": 0.05, "seed": 1}
        return RunResult({**defaults, **config}, {}, [])

    results = [
        run(strategy="fedavg"),
        run(strategy="fedavg", seed=2),
        run(strategy="fedbif", **{"fedbif-bits": 3}),
        run(strategy="fedbif"),
        run(strategy="lbi-fl", **{"lbi-mode": "ui8"}),
        run(strategy="lbi-fl", **{"lbi-mode": "ui4", "learning-rate": 0.1}),
    ]
    label_runs(results)
    assert [r.method for r in results] == [
        "fedavg learning-rate=0.05",
        "fedavg learning-rate=0.05",
        "fedbif fedbif-bits=3 learning-rate=0.05",
        "fedbif fedbif-bits=4 learning-rate=0.05",
        "lbi-fl lbi-mode=ui8 learning-rate=0.05",
        "lbi-fl lbi-mode=ui4 learning-rate=0.1",
    ]
