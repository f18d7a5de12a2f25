"""The real path: ``flwr run`` on a local Ray simulation, through the launcher ``make run`` uses."""

from __future__ import annotations

import json

import pytest

from core.results import read_rounds
from tools.launch import launch, superlink_pids


def test_flwr_run_two_rounds_three_clients(tmp_path):
    home = tmp_path / "flwr-home"
    code, status, results_dir = launch(
        run_config=f"strategy='fedavg' num-server-rounds=2 results-dir='{tmp_path}' "
        "run-name='e2e' device='cpu'",
        num_supernodes=3,
        flwr_home=home,
        log_path=tmp_path / "run.log",
    )
    log = (tmp_path / "run.log").read_text()
    assert code == 0, log[-3000:]
    assert status == "finished:completed"
    assert results_dir == tmp_path / "e2e"
    rows = read_rounds(results_dir / "rounds.csv")
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert all(row["clients"] == 3 for row in rows[1:])
    summary = json.loads((results_dir / "summary.json").read_text())
    assert summary["completed"] and summary["num_clients"] == 3
    assert 32.0 <= summary["uplink_bpp"] <= 32.5
    assert "[fedavg] round 2/2" in log
    assert not superlink_pids(home)  # the SuperLink it started (and only that one) is gone


def test_flwr_run_reports_a_failed_server_app(tmp_path, monkeypatch):
    """A config the launcher would refuse, submitted as plain ``flwr run`` submits it: the
    ServerApp refuses it at start, its one-line reason comes before Flower's traceback, and
    the launcher reports the run failed."""
    import tools.launch

    monkeypatch.setattr(tools.launch, "validate_run_config", lambda run_config: run_config)
    code, status, _ = launch(
        run_config=f"num-server-rounds=1 strategy='fedbatt' results-dir='{tmp_path}'",
        num_supernodes=2,
        flwr_home=tmp_path / "flwr-home",
        log_path=tmp_path / "run.log",
    )
    assert code != 0
    assert status.startswith("finished:failed")
    log = (tmp_path / "run.log").read_text()
    refused = log.index("run refused: invalid run config: strategy must be one of")
    assert "did you mean 'fedbat'" in log[refused:].splitlines()[0]
    assert "Traceback" not in log[:refused]


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        ("num-server-rounds=1 batch-size=0", "batch-size must be int in [1, 1000000], got 0"),
        ("num-server-roundz=3", "unknown key 'num-server-roundz' (did you mean"),
        ("learning-rate=fast", "learning-rate must be float in (0, 100], got 'fast'"),
        ("strategy=fedbatt", "got 'fedbatt' (did you mean 'fedbat'"),
        ("seed=1 extra", "expected key=value, got 'extra'"),
        ("strategy='fedbat' fedbat-alpha-min=0.5", "must be below fedbat-alpha-max"),
    ],
)
def test_a_config_the_app_refuses_is_not_submitted(tmp_path, run_config, message):
    """Flower would only say "Invalid run configuration" for an unknown key (and print a
    traceback for an unquoted word); the launcher says what is wrong in one line, with "did you
    mean", before any SuperLink starts."""
    code, status, results_dir = launch(run_config=run_config, flwr_home=tmp_path / "home")
    assert code == 2 and results_dir is None
    assert status.startswith("not started: ") and message in status
    assert "\n" not in status
    assert not (tmp_path / "home").exists()


def test_flwr_run_fedbif(tmp_path):
    code, status, results_dir = launch(
        run_config=f"strategy='fedbif' num-server-rounds=2 results-dir='{tmp_path}' "
        "run-name='fedbif' device='cpu'",
        num_supernodes=2,
        flwr_home=tmp_path / "flwr-home",
        log_path=tmp_path / "run.log",
    )
    assert code == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert status == "finished:completed"
    summary = json.loads((results_dir / "summary.json").read_text())
    assert summary["strategy"] == "fedbif" and summary["completed"]
    # The lossless stages are on by default (auto): entropy-coded words, round 2 against the
    # words each client kept in its node state, uploads against the bits it received; every
    # message decoded (nothing rejected) through real Flower messages and Ray workers.
    config = summary["config"]
    assert (config["entropy"], config["downlink-reference"], config["uplink-reference"]) == (
        "ans",
        "last",
        "received",
    )
    assert summary["rejected"] == 0 and summary["failures"] == 0
    # Below the 1 bit per parameter the packed bits alone would cost (measured ~0.8).
    assert summary["uplink_bpp"] < 0.95 and summary["downlink_bpp"] < 4.0


def test_two_runs_at_the_same_time_do_not_meet(tmp_path):
    """Each launch gets its own Flower home and free SuperLink ports (as two `make run`s, or the
    tests beside a `make run`): both complete, and each stops only its own SuperLink."""
    from concurrent.futures import ThreadPoolExecutor

    def run(name: str) -> tuple[int, str, object]:
        return launch(
            run_config=f"num-server-rounds=2 results-dir='{tmp_path}' run-name='{name}' "
            "device='cpu'",
            num_supernodes=2,
            log_path=tmp_path / f"{name}.log",
        )

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(run, ["first", "second"]))
    for name, (code, status, results_dir) in zip(["first", "second"], outcomes, strict=True):
        assert code == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
        assert status == "finished:completed" and results_dir == tmp_path / name


def launch_two_rounds(tmp_path, run_config: str, run_name: str):  # noqa: ANN001, ANN201
    """2 rounds on 2 SuperNodes through ``flwr run``: (exit code, status, results dir, log)."""
    code, status, results_dir = launch(
        run_config=f"{run_config} num-server-rounds=2 results-dir='{tmp_path}' "
        f"run-name='{run_name}' device='cpu'",
        num_supernodes=2,
        flwr_home=tmp_path / "flwr-home",
        log_path=tmp_path / "run.log",
    )
    return code, status, results_dir, (tmp_path / "run.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "attack", "logged"),
    [
        # Two of the crashes, through real gRPC messages; every attack kind runs
        # in-process on every strategy in tests/test_hostile_clients.py.
        ("lbi-fl", "bad-metrics", "rejected payload of client"),  # next weight width 32
        ("fedbif", "wrong-dtype", "extras must be float16, got float32"),  # float32 extras
    ],
)
def test_a_hostile_client_through_flwr_run_is_rejected_and_the_run_completes(
    tmp_path, strategy, attack, logged
):
    code, status, results_dir, log = launch_two_rounds(
        tmp_path, f"strategy='{strategy}' attack='{attack}' attack-fraction=0.5", "hostile"
    )
    assert code == 0 and status == "finished:completed", log[-3000:]
    assert logged in log, log[-3000:]
    rows = read_rounds(results_dir / "rounds.csv")
    rejected = sum(row["rejected"] for row in rows)
    assert rejected == 2  # one attacker, two rounds
    summary = json.loads((results_dir / "summary.json").read_text())
    assert summary["completed"] and summary["final_accuracy"] > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedbat", "qsgd"])
def test_a_quantized_entropy_coded_downlink_through_flwr_run(tmp_path, strategy):
    """downlink=uq entropy=ans through real Flower messages: the run completes, every client's
    message decodes (no failure, no rejection) and the downlink costs what 4-bit codes cost."""
    code, status, results_dir, log = launch_two_rounds(
        tmp_path, f"strategy='{strategy}' downlink='uq' downlink-bits=4 entropy='ans'", "uq"
    )
    assert code == 0 and status == "finished:completed", log[-3000:]
    rows = read_rounds(results_dir / "rounds.csv")
    assert all(row["clients"] == 2 and row["failures"] == row["rejected"] == 0 for row in rows[1:])
    summary = json.loads((results_dir / "summary.json").read_text())
    assert summary["downlink_bpp"] < 4.5 and summary["final_accuracy"] > 0.2
