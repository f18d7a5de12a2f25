"""The real path: ``flwr run`` on a local Ray simulation, through the launcher ``make run`` uses."""

from __future__ import annotations

import json

from core.results import read_rounds
from tools.launch import launch, superlink_pids


def test_flwr_run_two_rounds_three_clients(tmp_path):
    home = tmp_path / "flwr-home"
    code, status, results_dir = launch(
        run_config=f"num-server-rounds=2 results-dir='{tmp_path}' run-name='e2e' device='cpu'",
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


def test_flwr_run_reports_a_failed_server_app(tmp_path):
    # Valid for Flower (the key exists) but rejected by our validation inside the ServerApp.
    code, status, _ = launch(
        run_config="num-server-rounds=1 batch-size=0",
        num_supernodes=2,
        flwr_home=tmp_path / "flwr-home",
        log_path=tmp_path / "run.log",
    )
    assert code != 0
    assert status.startswith("finished:failed")
    assert "batch-size must be int >= 1" in (tmp_path / "run.log").read_text()


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
    assert 1.0 < summary["uplink_bpp"] < 1.2 and 4.0 < summary["downlink_bpp"] < 4.2
