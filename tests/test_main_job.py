"""The main job's pieces: per-run curves, the cached FedAvg comparison and its closing summary."""

from __future__ import annotations

import json

import pytest

from core.plots import PLOT_NAME
from tools import main_job
from tools.inprocess import run_inprocess

TINY = {
    "strategy": "fedbif",
    "dataset": "digits",
    "num-server-rounds": 2,
    "local-epochs": 1,
    "checkpoint": False,
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_every_completed_run_draws_its_curves(tmp_path):
    strategy = run_inprocess({**TINY, "results-dir": str(tmp_path)}, num_clients=3)
    run_dir = strategy.results.run_dir
    picture = run_dir / PLOT_NAME
    assert picture.read_bytes()[:8] == PNG_MAGIC and picture.stat().st_size > 10_000
    assert not list(run_dir.glob("*.tmp.png"))


def test_the_fedavg_comparison_runs_once_per_config_and_code_version(tmp_path, monkeypatch):
    config = main_job.effective_config("num-server-rounds=1 local-epochs=1 strategy='fedbif'")
    cache = tmp_path / ".baselines"
    first, cached = main_job.run_baseline(config, 3, cache)
    assert not cached
    summary = json.loads((first / "summary.json").read_text())
    assert summary["strategy"] == "fedavg" and summary["completed"]
    # Same setting: FedAvg's config equals the method's apart from the strategy.
    differing = {k for k, v in summary["config"].items() if config.get(k) != v}
    assert differing <= {
        "strategy",
        "results-dir",
        "run-name",
        "checkpoint",
        "entropy",  # the lossless stages: resolved per method (FedAvg sends no codes)
        "downlink-reference",
        "uplink-reference",
    }
    again, cached = main_job.run_baseline(config, 3, cache)
    assert cached and again == first
    other_seed, cached = main_job.run_baseline({**config, "seed": 7}, 3, cache)
    assert not cached and other_seed != first
    monkeypatch.setattr(main_job, "code_version", lambda: "edited")
    edited, cached = main_job.run_baseline(config, 3, cache)
    assert not cached and edited not in (first, other_seed)  # never a stale reuse


def test_the_code_version_follows_the_sources(tmp_path):
    (tmp_path / "core").mkdir()
    source = tmp_path / "core" / "x.py"
    source.write_text("a = 1\n")
    before = main_job.code_version(tmp_path)
    assert main_job.code_version(tmp_path) == before
    source.write_text("a = 2\n")
    assert main_job.code_version(tmp_path) != before


def test_the_closing_summary_reports_measured_ratios():
    method = {
        "strategy": "fedbif",
        "final_accuracy": 0.95,
        "uplink_bytes": 1_000_000,
        "downlink_bytes": 3_000_000,
        "uplink_bpp": 1.0,
        "downlink_bpp": 3.0,
    }
    baseline = {
        "strategy": "fedavg",
        "final_accuracy": 0.97,
        "uplink_bytes": 32_000_000,
        "downlink_bytes": 32_000_000,
        "uplink_bpp": 32.0,
        "downlink_bpp": 32.0,
    }
    line = main_job.savings_line(method, baseline)
    assert "16.0x fewer bytes" in line and "uplink 32.0x" in line and "downlink 10.7x" in line
    assert "-2.00 points" in line
    table = main_job.comparison_table([("fedbif", method), ("fedavg", baseline)])
    assert "95.00%" in table and "4.000" in table and "64.000" in table


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ("strategy='nope'", "strategy"),
        ("strategy=fedbatt", "did you mean 'fedbat'"),  # unquoted, misspelt
        ("num-server-rounds=-1", "num-server-rounds must be int in [1, 100000]"),
        ("learning-rate=fast", "learning-rate must be float in (0, 100], got 'fast'"),
        ("learnin-rate=0.1", "did you mean 'learning-rate'"),
        ("seed=[1,2]", "seed must be a single value"),
    ],
)
def test_a_bad_run_config_fails_in_one_line_before_anything_runs(bad, named, tmp_path, capsys):
    code = main_job.main(["--run-config", bad, "--results-dir", str(tmp_path)])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 2 and "Traceback" not in text
    [line] = [line for line in text.splitlines() if "not started" in line]
    assert named in line
    assert not list(tmp_path.iterdir())


def test_make_help_is_the_default_target_and_names_the_two_commands():
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = main_job.PROJECT_ROOT
    done = subprocess.run(["make", "-s"], cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "make run" in done.stdout and "make test" in done.stdout and "make check" in done.stdout
    dry = subprocess.run(["make", "-n"], cwd=root, capture_output=True, text=True, timeout=60)
    assert "pip install" not in dry.stdout  # a bare make installs nothing
