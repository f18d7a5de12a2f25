"""Simulation on an existing Ray cluster instead of a Ray instance of its own.

Flower 1.41 passes no cluster address through its federation config (``init-args`` only knows
``num-cpus``, ``num-gpus``, ``logging-level``, ``log-to-driver``): the simulation process calls
``ray.init()`` without an address, and Ray then connects to the cluster named by ``RAY_ADDRESS``.
The variable must be in the environment of the SuperLink that runs the simulation (its
``flwr-simulation`` child inherits it). This test starts a private Ray head on loopback (free
ports, its own ``--temp-dir``, so that nobody else's ``ray.init()`` finds it and ``ray stop`` is
never needed), runs the app on a simulation SuperLink started with ``RAY_ADDRESS``, and checks
from the head's own session logs that the run's driver and actors ran on that cluster.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.results import read_rounds
from deploy.cliconfig import write_connection
from deploy.procs import (
    PROJECT_ROOT,
    VENV_BIN,
    ManagedProcess,
    alive,
    flwr_environment,
    process_tree,
    stop_marked,
)
from tools.launch import free_port

RAY = VENV_BIN / "ray"
pytestmark = [
    pytest.mark.deploy,
    pytest.mark.skipif(not RAY.exists(), reason=f"no Ray CLI at {RAY} (flwr[simulation])"),
]


@dataclass(frozen=True)
class RayHead:
    address: str
    temp_dir: Path
    process: ManagedProcess

    def session_logs(self) -> list[str]:
        logs = self.temp_dir / "session_latest" / "logs"
        return sorted(p.name for p in logs.iterdir()) if logs.is_dir() else []


@pytest.fixture
def ray_head() -> Iterator[RayHead]:
    """A one-machine Ray cluster, stopped by PID with all its processes, whatever happens."""
    # Short path: Ray's Unix sockets live under it and socket paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="commfl-ray-", dir="/tmp"))
    port = free_port()
    command = [
        str(RAY), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
        "--include-dashboard=false", f"--temp-dir={temp_dir}",
        # Every port Ray would otherwise take at a fixed default, so a colleague's cluster on
        # this machine neither blocks this one nor is disturbed by it.
        f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
    ]  # fmt: skip
    env = flwr_environment(temp_dir / "flwr-home", {"OMP_NUM_THREADS": "1"})
    env.pop("RAY_ADDRESS", None)
    head = ManagedProcess("ray-head", command, temp_dir / "ray-head.log", env)
    pids: list[int] = []
    try:
        if not head.wait_for_log("Ray runtime started", timeout=120):
            pytest.fail(f"Ray head did not start:\n{head.log()[-3000:]}")
        yield RayHead(f"127.0.0.1:{port}", temp_dir, head)
        pids = process_tree(head.pid) if head.running() else []
    finally:
        head.stop(timeout=20)
        # Anything that left the tree (re-parented) still carries the head's FLWR_HOME.
        stop_marked("FLWR_HOME", f"{temp_dir}/")
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert pids and not [pid for pid in pids if alive(pid)], "Ray processes outlived the test"


def test_simulation_runs_on_an_existing_ray_cluster(ray_head, tmp_path):
    superlink_port = free_port()
    home = tmp_path / "flwr-home"
    env = flwr_environment(home, {"RAY_ADDRESS": ray_head.address, "OMP_NUM_THREADS": "1"})
    # An explicit address: the CLI never starts (and leaves behind) a SuperLink of its own, and
    # the 39091 one of a concurrent `make run` is not used.
    write_connection(home, "ray-sim", f"127.0.0.1:{superlink_port}", insecure=True)
    assert not [name for name in ray_head.session_logs() if name.startswith("python-core-driver")]
    superlink = ManagedProcess(
        "superlink",
        [
            "flower-superlink",
            "--insecure",
            "--simulation",
            "--host",
            "127.0.0.1",
            "--port",
            str(superlink_port),
        ],  # fmt: skip
        tmp_path / "superlink.log",
        env,
    )
    try:
        assert superlink.wait_for_log("Uvicorn running on", 60), superlink.log()[-3000:]
        run = subprocess.run(
            [
                "flwr",
                "run",
                str(PROJECT_ROOT),
                "ray-sim",
                "--stream",
                "--federation-config",
                "num-supernodes=2 client-resources-num-cpus=2",
                "--run-config",
                f"num-server-rounds=1 device='cpu' results-dir='{tmp_path}' run-name='ray'",
            ],  # fmt: skip
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        listing = subprocess.run(
            ["flwr", "ls", "ray-sim", "--format", "json"],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        survived = superlink.running()  # False: something else on this machine stopped it
        superlink.stop()
        stop_marked("FLWR_HOME", str(home))
    log = run.stdout + run.stderr
    answer = json.loads(listing.stdout or "{}")
    assert answer.get("success"), f"{answer} (SuperLink alive at end: {survived})\n{log[-3000:]}"
    assert [r["status"] for r in answer["runs"]] == ["finished:completed"], log[-4000:]
    rows = read_rounds(tmp_path / "ray" / "rounds.csv")
    assert [row["round"] for row in rows] == [0, 1] and rows[1]["clients"] == 2
    # The run's driver (flwr-simulation) and its ClientApp actors ran on *this* cluster: Ray
    # keeps their logs in the session folder of the cluster they joined. Had RAY_ADDRESS been
    # ignored, they would have started a private Ray instance and logged elsewhere.
    logs = ray_head.session_logs()
    assert [name for name in logs if name.startswith("python-core-driver")], logs
    assert [name for name in logs if name.startswith("worker-") and "-01000000-" in name], logs
