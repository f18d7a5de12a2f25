"""Experiment harness: grid expansion, resumption, table aggregation, plots, shipped files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from core.checkpoint import save_checkpoint
from core.config import RunConfig, parse_run_config
from core.link import PROFILES, client_link, client_round_seconds
from core.results import ResultsWriter
from fl_app.methods import all_config_keys
from tools.experiment import (
    Experiment,
    Point,
    collect,
    load_experiment,
    run_config_default,
    run_experiment,
    table_rows,
    write_report,
)
from tools.launch import toml_value

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


def fake_run(
    point: Point,
    folder: Path,
    accuracy: list[float],
    uplink: int = 1000,
    validation: list[float] | None = None,
    train_seconds: float | None = None,
) -> None:
    """A finished run folder as the app writes it; ``validation``: accuracy per round on the
    validation split (None: a run without one, NaN columns and null summary fields)."""
    writer = ResultsWriter(folder / point.name)
    val = validation if validation is not None else [math.nan] * len(accuracy)
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
                "val_accuracy": val[index],
                "val_loss": 1 - val[index],
                "link_seconds": math.nan,
                "link_seconds_total": math.nan,
                "late": 0,
                "aggregation_degraded": 0,
            }
        )
        if train_seconds is not None and index:  # clients.csv: two clients share the traffic
            writer.write_clients(
                [
                    {
                        "round": index,
                        "cid": str(10 + partition),
                        "partition": partition,
                        "downlink_bytes": uplink,
                        "uplink_bytes": uplink // 2,
                        "train_seconds": train_seconds * (1 + partition),
                        "link_seconds": math.nan,
                        "status": "accepted",
                    }
                    for partition in (0, 1)
                ]
            )
    writer.write_summary(
        {
            "completed": True,
            "config": point.config,
            "final_accuracy": accuracy[-1],
            "final_val_accuracy": val[-1],
            "best_val_accuracy": max(val),
            "uplink_bpp": 1.0,
            "downlink_bpp": 2.0,
            "uplink_bytes": uplink * (len(accuracy) - 1),
            "downlink_bytes": 2 * uplink * (len(accuracy) - 1),
            "num_params": 1000,
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


def test_an_interrupted_point_with_a_checkpoint_resumes_from_it(tmp_path):
    """A point whose folder has a checkpoint with rounds still to run, but no completed summary,
    goes on from it (``resume-from``). A checkpoint that already holds every round (stopped
    between its last round and its summary) or cannot be read is removed and the point starts
    afresh; the others start afresh anyway; and ``resume-from`` never labels a row."""
    experiment = demo(tmp_path)  # num-server-rounds = 2
    points = experiment.points()
    partial, full, broken = points[3], points[5], points[7]
    for point, done in ((partial, 1), (full, 2)):
        (experiment.folder / point.name).mkdir(parents=True)
        save_checkpoint(experiment.folder / point.name, {"w": np.zeros(2)}, {"round": done})
    (experiment.folder / broken.name).mkdir(parents=True)
    (experiment.folder / broken.name / "checkpoint.npz").write_bytes(b"not a checkpoint")
    seen: dict[str, dict] = {}

    def runner(point: Point, folder: Path) -> None:
        seen[point.name] = dict(point.config)
        fake_run(point, folder, [0.1, 0.6])

    lines: list[str] = []
    assert run_experiment(experiment, runner, echo=lines.append) == len(points)
    checkpoint = experiment.folder / partial.name / "checkpoint.npz"
    assert seen[partial.name]["resume-from"] == str(checkpoint)
    assert all("resume-from" not in c for name, c in seen.items() if name != partial.name)
    assert f"{partial.name}: resuming from {checkpoint} after round 1" in lines
    assert f"{full.name}: checkpoint holds all 2 rounds but no summary; starting afresh" in lines
    assert any(line.startswith(f"{broken.name}: unreadable checkpoint") for line in lines)
    assert not (experiment.folder / full.name / "checkpoint.npz").exists()
    assert not (experiment.folder / broken.name / "checkpoint.npz").exists()
    summary_path = experiment.folder / partial.name / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["config"]["resume-from"] = str(checkpoint)  # as the app records a resumed run
    summary_path.write_text(json.dumps(summary))
    assert {r.method for r in collect(experiment.folder)} == {"fedavg", "fedbif"}


def test_a_point_another_process_finished_meanwhile_is_not_run_again(tmp_path):
    """Two harness processes on one grid (e.g. one per seed): a point that was unfinished when
    this process listed its work, but finished by the other before its turn, is skipped."""
    experiment = demo(tmp_path)
    points = experiment.points()
    calls: list[str] = []

    def runner(point: Point, folder: Path) -> None:
        calls.append(point.name)
        fake_run(point, folder, [0.1, 0.6])
        if point == points[0]:  # meanwhile, "another process" completes the last point
            fake_run(points[-1], folder, [0.1, 0.6])

    lines: list[str] = []
    run_experiment(experiment, runner, echo=lines.append)
    assert points[-1].name not in calls and len(calls) == len(points) - 1
    assert lines[-1].endswith(f"{points[-1].name} already done")


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
    # uplink 2 MB + downlink 4 MB per round, both rounds: from both byte columns.
    assert fedavg["total_mb_to_target"] == pytest.approx(12.0)
    assert fedavg["total_gb"] == pytest.approx(2 * 6e6 / 1e9)
    fedbif = next(row for row in iid if row["method"] == "fedbif")
    assert math.isnan(fedbif["uplink_mb_to_target"]) and fedbif["reached_target"] == 0

    report = write_report(experiment)
    text = report.read_text()
    assert "80.00 ± 10.00" in text and "not reached" in text
    pngs = list(experiment.folder.glob("*.png"))
    # Per group: accuracy by round and uplink MB, and accuracy by total (uplink + downlink) MB.
    assert len(pngs) == 2 * 2 and all(p.stat().st_size > 5000 for p in pngs)
    assert len(list(experiment.folder.glob("*-total.png"))) == 2
    assert "total MB to 50%" in text and "12.00 (3/3)" in text
    assert (experiment.folder / "table.csv").read_text().count("\n") == 1 + 4
    assert "last 2 rounds" not in text  # off unless the experiment asks for it

    # tail-rounds = 2: each run's last two rounds (round 0, the initial model, left out):
    # fedavg (0.4 + final) / 2 per seed -> 60, 65, 55 %: mean 60, sample std 5.
    tables = table_rows(collect(experiment.folder), target=0.5, tail=2)
    fedavg = next(
        r for r in tables[("dataset=digits", "partitioner=iid")] if r["method"] == "fedavg"
    )
    assert fedavg["tail_accuracy_mean"] == pytest.approx(60.0)
    assert fedavg["tail_accuracy_std"] == pytest.approx(5.0)
    experiment.tail_rounds = 2
    text = write_report(experiment).read_text()
    assert "last 2 rounds % (mean ± std)" in text and "60.00 ± 5.00" in text


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


# ------------------------------------------------------------------------------ tuning
TUNED = """
name = "tuned"
output = "out"
seeds = [1, 2]
target-accuracy = 0.5
[fixed]
dataset = "digits"
num-server-rounds = 2
validation-fraction = 0.1
[federation]
num-supernodes = 3
[grid]
partitioner = ["iid", "dirichlet"]
[[grid.method]]
strategy = "fedavg"
[[grid.method]]
strategy = "signsgd"
[[grid.method]]
strategy = "lbi-fl"
lbi-mode = "ui8"
[[grid.method]]
strategy = "lbi-fl"
lbi-mode = "ui4"
[[grid.method]]
strategy = "fedbif"
fedbif-bits = 3
[[grid.method]]
strategy = "fedbif"
fedbif-bits = 4
[tune]
metric = "final_val_accuracy"
[tune.fedavg]
learning-rate = [0.01, 0.1]
[tune.signsgd]
signsgd-server-lr = [0.0005, 0.001, 0.002]
[tune.lbi-fl]
learning-rate = [0.01, 0.1]
"""

#: (partitioner, row, tuned value) -> (final test accuracy, final validation accuracy per seed).
#: Test and validation disagree on purpose: the best test accuracy never has the best mean
#: validation accuracy, and seed 1 alone would choose otherwise than the mean over seeds.
OUTCOMES = {
    ("iid", "fedavg", 0.01): (0.95, {1: 0.95, 2: 0.10}),  # mean validation 0.525
    ("iid", "fedavg", 0.1): (0.60, {1: 0.60, 2: 0.60}),  # chosen
    ("dirichlet", "fedavg", 0.01): (0.55, {1: 0.70, 2: 0.70}),  # chosen: per group
    ("dirichlet", "fedavg", 0.1): (0.99, {1: 0.65, 2: 0.65}),
    ("iid", "signsgd", 0.0005): (0.97, {1: 0.70, 2: 0.70}),
    ("iid", "signsgd", 0.001): (0.99, {1: 0.60, 2: 0.60}),
    ("iid", "signsgd", 0.002): (0.52, {1: 0.75, 2: 0.75}),  # chosen
    ("iid", "ui8", 0.01): (0.70, {1: 0.80, 2: 0.80}),  # chosen: per row (mode)
    ("iid", "ui8", 0.1): (0.90, {1: 0.70, 2: 0.70}),
    ("iid", "ui4", 0.01): (0.90, {1: 0.50, 2: 0.50}),
    ("iid", "ui4", 0.1): (0.65, {1: 0.55, 2: 0.55}),  # chosen
}


def tuned_demo(tmp_path, text: str = TUNED) -> Experiment:
    path = tmp_path / "tuned.toml"
    path.write_text(text)
    return load_experiment(path)


def fake_tuned_runs(experiment: Experiment) -> None:
    for point in experiment.points():
        config = point.config
        row = config.get("lbi-mode", config["strategy"])
        value = config.get("learning-rate", config.get("signsgd-server-lr"))
        test, validation = OUTCOMES.get(
            (config["partitioner"], row, value), (0.8, {1: 0.8, 2: 0.8})
        )
        val = validation[config["seed"]]
        fake_run(point, experiment.folder, [0.1, 0.4, test], validation=[0.1, 0.3, val])


def test_tune_block_multiplies_points_per_strategy(tmp_path):
    experiment = tuned_demo(tmp_path)
    assert experiment.tune_metric == "final_val_accuracy"
    points = experiment.points()
    # per seed and partition: fedavg 2 + signsgd 3 + lbi-fl 2 modes x 2 + fedbif 2 bit-widths
    assert len(points) == 2 * 2 * (2 + 3 + 2 * 2 + 2)
    assert len({p.name for p in points}) == len(points)
    keys = all_config_keys()
    for point in points:
        assert point.config["validation-fraction"] == 0.1
        parse_run_config(point.config, keys)
    lrs = {p.config.get("learning-rate") for p in points if p.config["strategy"] == "fedavg"}
    assert lrs == {0.01, 0.1}
    assert not any("learning-rate" in p.config for p in points if p.config["strategy"] == "fedbif")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("validation-fraction = 0.1\n", ""), "needs validation-fraction > 0"),
        (("validation-fraction = 0.1\n", "validation-fraction = 0.0\n"), "validation-fraction > 0"),
        (('metric = "final_val_accuracy"', 'metric = "accuracy"'), "tune.metric must be one of"),
        (("[tune.fedavg]", "[tune.fedpaq]"), "names strategies no point runs"),
        (
            (
                "learning-rate = [0.01, 0.1]\n[tune.signsgd]",
                "partitioner = ['iid']\n[tune.signsgd]",
            ),
            "grid axis",
        ),
        (
            ("learning-rate = [0.01, 0.1]\n[tune.signsgd]", "learning-rate = []\n[tune.signsgd]"),
            "non-empty list",
        ),
        (
            (
                "learning-rate = [0.01, 0.1]\n[tune.signsgd]",
                "learning-rate = [0.1, 0.1]\n[tune.signsgd]",
            ),
            "twice",
        ),
    ],
)
def test_bad_tune_blocks_fail_when_the_file_loads(tmp_path, edit, message):
    old, new = edit
    assert old in TUNED
    with pytest.raises(ValueError, match=message):
        tuned_demo(tmp_path, TUNED.replace(old, new, 1))


def test_tuner_chooses_by_validation_only(tmp_path):
    from tools.experiment import choose_settings

    experiment = tuned_demo(tmp_path)
    fake_tuned_runs(experiment)
    results = collect(experiment.folder, experiment.tune)
    chosen = {
        (c.group[-1], c.method): dict(c.setting)
        for c in choose_settings(results, experiment.tune_metric)
        if c.chosen
    }
    iid, dirichlet = "partitioner=iid", "partitioner=dirichlet"
    assert chosen[(iid, "fedavg")] == {"learning-rate": 0.1}
    assert chosen[(dirichlet, "fedavg")] == {"learning-rate": 0.01}
    assert chosen[(iid, "signsgd")] == {"signsgd-server-lr": 0.002}
    assert chosen[(iid, "lbi-fl lbi-mode=ui8")] == {"learning-rate": 0.01}
    assert chosen[(iid, "lbi-fl lbi-mode=ui4")] == {"learning-rate": 0.1}
    assert chosen[(iid, "fedbif fedbif-bits=3")] == {}  # untuned rows keep their one setting

    # Any test accuracies: the same choice (the tuner never reads them).
    for index, result in enumerate(results):
        result.summary["final_accuracy"] = (index * 0.37) % 1.0
    again = {
        (c.group[-1], c.method): dict(c.setting)
        for c in choose_settings(results, experiment.tune_metric)
        if c.chosen
    }
    assert again == chosen

    # Another validation metric may choose otherwise: by best_val_accuracy, learning rate 0.01
    # has seed 2's round-1 peak of 0.30 instead of its final 0.10 (mean 0.625 > 0.60).
    best = {
        (c.group[-1], c.method): dict(c.setting)
        for c in choose_settings(results, "best_val_accuracy")
        if c.chosen
    }
    assert best[(iid, "fedavg")] == {"learning-rate": 0.01}

    # The main table shows the chosen setting's TEST figures, the appendix the whole grid.
    results = collect(experiment.folder, experiment.tune)  # the true test accuracies again
    tables = table_rows(
        [r for c in choose_settings(results, experiment.tune_metric) if c.chosen for r in c.runs],
        target=0.5,
    )
    fedavg = next(row for row in tables[("dataset=digits", iid)] if row["method"] == "fedavg")
    assert fedavg["tuned"] == "learning-rate=0.1" and fedavg["seeds"] == 2
    assert fedavg["accuracy_mean"] == pytest.approx(60.0)
    assert fedavg["validation_mean"] == pytest.approx(60.0)

    report = write_report(experiment).read_text()
    assert "Appendix: tuning grid" in report and "tuned setting" in report
    assert "| fedavg | learning-rate=0.1 | 60.00 ± 0.00 | 60.00 ± 0.00 |" in report
    assert "| fedavg | learning-rate=0.01 | 2 | 52.50 ± 60.10 | 95.00 ± 0.00 |  |" in report
    grid = (experiment.folder / "tuning.csv").read_text().splitlines()
    assert len(grid) == 1 + 2 * (2 + 3 + 2 + 2)  # header + every tuned setting of both groups


def test_tuned_rows_without_validation_cannot_be_chosen(tmp_path):
    from tools.experiment import choose_settings

    experiment = tuned_demo(tmp_path)
    for point in experiment.points():
        fake_run(point, experiment.folder, [0.1, 0.5])  # no validation split: null in summary
    with pytest.raises(ValueError, match="no final_val_accuracy"):
        choose_settings(collect(experiment.folder, experiment.tune), experiment.tune_metric)


def test_report_rows_separate_every_varying_axis(tmp_path):
    """LBI-FL's modes and FedBiF's bit-widths are rows of their own, never merged."""
    experiment = tuned_demo(tmp_path)
    fake_tuned_runs(experiment)
    results = collect(experiment.folder, experiment.tune)
    chosen = [r for c in choose_settings_of(results) if c.chosen for r in c.runs]
    for rows in table_rows(chosen, target=0.5).values():
        assert [row["method"] for row in rows] == [
            "fedavg",
            "fedbif fedbif-bits=3",
            "fedbif fedbif-bits=4",
            "lbi-fl lbi-mode=ui4",
            "lbi-fl lbi-mode=ui8",
            "signsgd",
        ]
        assert all(row["seeds"] == 2 for row in rows)  # one tuned setting per row, both seeds


def choose_settings_of(results):
    from tools.experiment import choose_settings

    return choose_settings(results, "final_val_accuracy")


def test_a_key_added_after_some_runs_takes_its_default_for_them():
    """Runs from before a key existed lack it in their config; they ran at the key's default
    (new keys keep the old behaviour), so they merge with new runs at the default and split from
    runs at another value (a resumed grid mixes runs of two code versions)."""
    from tools.experiment import RunResult, label_runs

    old = RunResult({"strategy": "fedavg", "seed": 1, "lr": 0.1}, {}, [])
    new = RunResult({"strategy": "qsgd", "seed": 1, "lr": 0.1, "aggregation": "mean"}, {}, [])
    newer = RunResult({"strategy": "fedpaq", "seed": 1, "lr": 0.1, "aggregation": "median"}, {}, [])
    label_runs([old, new, newer])
    assert old.label == "fedavg aggregation=mean"
    assert new.label == "qsgd aggregation=mean" and newer.label == "fedpaq aggregation=median"
    old = RunResult({"strategy": "fedavg", "seed": 1, "lr": 0.1}, {}, [])
    label_runs([old, new])
    assert (old.label, new.label) == ("fedavg", "qsgd")
    # Same method: the runs without the key and the runs at a new value are two rows.
    before = RunResult({"strategy": "fedpaq", "seed": 1, "downlink": "uq"}, {}, [])
    after = RunResult(
        {"strategy": "fedpaq", "seed": 1, "downlink": "uq", "downlink-reference": "last"}, {}, []
    )
    label_runs([before, after])
    assert before.label == "fedpaq downlink-reference=none"
    assert after.label == "fedpaq downlink-reference=last"


def test_report_models_time_to_target_on_link_profiles(tmp_path):
    """With link-profiles, the report adds time to the target per profile, modelled from each
    run's clients.csv (slowest client per round, summed until the target round), once at the
    runs' own message sizes and once scaled; the fastest method per profile is in bold."""
    text = EXAMPLE.replace(
        "target-accuracy = 0.5",
        'target-accuracy = 0.5\nlink-profiles = ["iot", "broadband"]'
        "\nlink-scale-params = [0, 4000]",
    )
    path = tmp_path / "demo.toml"
    path.write_text(text)
    experiment = load_experiment(path)
    for point in experiment.points():
        fedavg = point.config["strategy"] == "fedavg"
        curve = [0.1, 0.4, 0.8] if fedavg else [0.1, 0.6, 0.7]
        fake_run(point, experiment.folder, curve, uplink=200_000, train_seconds=1.0)

    def expected(seed: int, profile: str, rounds: int, scale: int = 1) -> float:
        return rounds * max(
            client_round_seconds(
                200_000 * scale,
                100_000 * scale,
                1.0 + partition,
                client_link(PROFILES[profile], seed, partition),
            )
            for partition in (0, 1)
        )

    report = write_report(experiment).read_text()
    assert "Time to 50% on modelled links" in report
    assert "messages scaled to 4,000 parameters" in report
    # fedbif reaches 50% in round 1, fedavg in round 2: fedbif is the fastest everywhere.
    for profile, scale in (("iot", 1), ("broadband", 1), ("iot", 4)):
        fedbif = sum(expected(seed, profile, 1, scale) for seed in (1, 2, 3)) / 3
        fedavg = sum(expected(seed, profile, 2, scale) for seed in (1, 2, 3)) / 3
        for seconds, bold in ((fedbif, True), (fedavg, False)):
            shown = f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"
            assert (f"**{shown}**" in report) == bold and shown in report
    assert len(list(experiment.folder.glob("*-time.png"))) == 2


def test_where_selects_a_slice_of_the_grid(tmp_path):
    """``--where KEY=VALUE``: only the matching points run (values as the file writes them);
    a key no point sets is refused with the keys they do set."""
    from tools.experiment import select_points

    experiment = demo(tmp_path)
    points = experiment.points()
    fedavg = select_points(points, ["strategy=fedavg"])
    assert fedavg and all(p.config["strategy"] == "fedavg" for p in fedavg)
    assert len(fedavg) == len(points) // 2
    one = select_points(points, ["strategy=fedavg", "seed=2", "dirichlet-alpha=0.1"])
    assert len(one) == 1 and one[0].config["seed"] == 2
    with pytest.raises(ValueError, match="KEY=VALUE"):
        select_points(points, ["strategy"])
    with pytest.raises(ValueError, match="no point sets"):
        select_points(points, ["stratgy=fedavg"])
    calls: list[str] = []
    ran = run_experiment(
        experiment,
        lambda point, folder: (calls.append(point.name), fake_run(point, folder, [0.1, 0.6])),
        echo=lambda _: None,
        where=["strategy=fedbif"],
    )
    assert ran == len(points) // 2 and all(name.startswith("strategy=fedbif") for name in calls)


def test_run_config_default_reads_the_app_schema_and_names_an_unknown_key():
    """The harness fills a key a grid leaves out from the app's own schema, and a misspelt key
    is a clear error, not a bare ``StopIteration``."""
    schema = {key.name: key.default for key in RunConfig.config_keys()}
    assert run_config_default("num-server-rounds") == schema["num-server-rounds"]
    assert run_config_default("strategy") == schema["strategy"]
    with pytest.raises(KeyError, match="num-server-round'"):
        run_config_default("num-server-round")


def test_a_misspelt_key_in_a_grid_fails_in_one_line_before_any_point_runs(tmp_path, capsys):
    """The harness validates every point first: the point, the key and "did you mean" on one
    line, exit 2, no traceback, nothing run."""
    from tools.experiment import main

    path = tmp_path / "grid.toml"
    path.write_text(
        'name = "typo"\noutput = "out"\nseeds = [1]\n[fixed]\nnum-server-rounds = 1\n'
        'learnin-rate = 0.1\n[grid]\nstrategy = ["fedavg", "fedbif"]\n'
    )
    code = main(["run", str(path), "--runner", "inprocess"])
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert code == 2 and "Traceback" not in text
    [line] = [line for line in text.splitlines() if "experiment not run" in line]
    assert "point strategy=fedavg_seed=1" in line and "did you mean 'learning-rate'" in line
    assert not list((tmp_path / "out" / "typo").glob("*/summary.json"))


def test_wire_keys_each_method_resolves_for_itself_label_no_row():
    """entropy / downlink-reference / uplink-reference differ from method to method once
    ``auto`` is resolved; they label rows only where one strategy's runs differ in them."""
    from tools.experiment import RunResult, label_runs

    lbi = RunResult({"strategy": "lbi-fl", "seed": 1, "entropy": "ans"}, {}, [])
    sign = RunResult({"strategy": "signsgd", "seed": 1, "entropy": "none"}, {}, [])
    label_runs([lbi, sign])
    assert (lbi.label, sign.label) == ("lbi-fl", "signsgd")
    on = RunResult({"strategy": "fedpaq", "seed": 1, "entropy": "ans"}, {}, [])
    off = RunResult({"strategy": "fedpaq", "seed": 1, "entropy": "none"}, {}, [])
    label_runs([on, off, sign])
    assert (on.label, off.label) == ("fedpaq entropy=ans", "fedpaq entropy=none")


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("paper-*.toml")), ids=lambda p: p.name)
def test_paper_presets_are_paper_literal(path):
    """Every paper preset sets this project's defences and deviations back to the papers'
    values: the common ones and those of every method it runs."""
    from core.config import PAPER_LITERAL
    from fl_app.methods import METHODS

    experiment = load_experiment(path)
    strategies = {point.config["strategy"] for point in experiment.points()}
    literal = dict(PAPER_LITERAL)
    for strategy in strategies:
        literal.update(METHODS.get(strategy).settings.paper_literal)
    wrong = {
        key: experiment.fixed.get(key)
        for key, value in literal.items()
        if experiment.fixed.get(key) != value
    }
    assert not wrong, f"{path.name} is not paper-literal in {wrong}"
    assert "paper-literal" in path.read_text()
