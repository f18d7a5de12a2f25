"""Run the app once on a local simulation federation and report honestly whether it worked.

``flwr run . --stream`` alone is not enough for scripts and CI: it starts a detached SuperLink that
outlives the run, and it exits 0 even when the ServerApp crashed. This launcher (used by
``make run``, the experiment harness and the end-to-end tests):

* validates the run config against the app's schema before submitting (Flower itself only
  says "Invalid run configuration" for an unknown key);
* gives the run its own Flower home and free local ports for the SuperLink's APIs, so several
  runs on one machine (tests beside ``make run``, two harnesses) never share a SuperLink;
* runs ``flwr run``, asks the SuperLink for the run's final status, stops the SuperLink it
  started (found by a marker in its environment, never another job's), and exits non-zero
  unless the run finished successfully.

    python -m tools.launch [--num-supernodes 10] [--run-config "k=v ..."] [--federation-config ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.settings import parse_overrides

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RUN_ID_PATTERN = re.compile(r"run (?:ID )?(\d{3,})", re.IGNORECASE)
RESULTS_PATTERN = re.compile(r"results of this run go to (\S+)")


def flwr_executable(path: str) -> str:
    """The ``flwr`` CLI: the one beside this interpreter (a venv), else the first on ``path``
    (an interpreter whose packages were installed elsewhere, e.g. ``pip install --target``)."""
    beside = Path(sys.executable).parent / "flwr"
    if beside.exists():
        return str(beside)
    found = shutil.which("flwr", path=path)
    if found is None:
        raise FileNotFoundError(f"no flwr executable beside {sys.executable} or on PATH")
    return found


def offline_environment(flwr_home: Path) -> dict[str, str]:
    """Environment for a local run with no network: no dependency install, no update check."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "MPLCONFIGDIR": str(flwr_home / "mplconfig"),
            "UV_CACHE_DIR": str(flwr_home / "uv-cache"),
            "RAY_DEDUP_LOGS": env.get("RAY_DEDUP_LOGS", "0"),
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        }
    )
    # flwr starts ``flower-superlink`` by name: the venv's scripts must be on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # Make the project importable by the ServerApp/ClientApp processes whatever their cwd.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    return env


#: environment variable marking the processes one launch started.
LAUNCH_MARKER = "COMMFL_LAUNCH"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bind port 0 and let the kernel choose).

    The port is released before it is used, so another process could take it meanwhile; the
    kernel hands out ephemeral ports round-robin, which makes that unlikely in practice.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def toml_value(value: Any) -> str:
    """A run-config value as TOML for ``flwr run --run-config``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


def toml_overrides(values: Mapping[str, Any]) -> str:
    """``key=value`` pairs as ``flwr run --run-config`` reads them."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def validate_run_config(run_config: str) -> str:
    """Check ``--run-config`` overrides before anything starts: the app's schema, the results
    folder (never another run's) and a resume (never a changed run); ``ConfigError`` says what
    is wrong in one line. Returns the overrides as ``flwr run`` reads them (an unquoted word,
    ``strategy=fedbat``, becomes quoted text)."""
    from fl_app.methods import load_config
    from fl_app.server_app import check_start

    overrides = parse_overrides(run_config)
    cfg, _ = load_config(overrides)
    check_start(cfg)
    return toml_overrides(overrides)


def superlink_pids(flwr_home: Path | None = None, launch_id: str | None = None) -> set[int]:
    """PIDs of running ``flower-superlink`` processes (Linux /proc); with ``flwr_home`` or
    ``launch_id``, only those started under that ``FLWR_HOME`` or by that launch: the SuperLink
    inherits the environment of the ``flwr run`` that started it, so a launcher never stops
    another job's SuperLink."""
    pids = set()
    if launch_id is not None:
        marker: bytes | None = f"{LAUNCH_MARKER}={launch_id}".encode()
    elif flwr_home is not None:
        marker = f"FLWR_HOME={flwr_home}".encode()
    else:
        marker = None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            if b"flower-superlink" not in cmdline:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0") if marker else []
        except OSError:
            continue
        if marker is None or marker in environ:
            pids.add(int(entry.name))
    return pids


def stop_processes(pids: set[int], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is still alive after ``timeout`` seconds."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if Path(f"/proc/{pid}").exists()}
        time.sleep(0.2)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_status(flwr: str, run_id: int, env: dict[str, str]) -> str:
    """The run's status string from the SuperLink, e.g. ``finished:completed``."""
    listing = subprocess.run(
        [flwr, "ls", "--run-id", str(run_id), "--format", "json"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        runs = json.loads(listing.stdout).get("runs", [])
    except json.JSONDecodeError:
        return f"unknown (flwr ls said: {listing.stdout.strip() or listing.stderr.strip()})"
    for run in runs:
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", "unknown"))
    return "unknown (run not listed)"


def launch(
    run_config: str = "",
    num_supernodes: int = 10,
    federation_config: str = "",
    flwr_home: Path | None = None,
    log_path: Path | None = None,
) -> tuple[int, str, Path | None]:
    """Run the app; returns (exit code, run status, results folder).

    ``flwr_home`` is used as given; by default each launch gets a fresh one under
    ``.flwr/launches/`` (removed afterwards), so concurrent launches share no SuperLink state.
    A run config the app would refuse is not submitted: exit code 2, the reason as status.
    """
    from core.config import ConfigError

    try:
        run_config = validate_run_config(run_config)
    except ConfigError as err:
        return 2, f"not started: {err}", None
    launch_id = uuid.uuid4().hex[:12]
    private_home = flwr_home is None
    flwr_home = flwr_home or PROJECT_ROOT / ".flwr" / "launches" / launch_id
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = offline_environment(flwr_home)
    env[LAUNCH_MARKER] = launch_id
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    flwr = flwr_executable(env["PATH"])
    federation = federation_config or (
        f"num-supernodes={num_supernodes} client-resources-num-cpus=1"
    )
    command = [flwr, "run", str(PROJECT_ROOT), "--stream", "--federation-config", federation]
    if run_config:
        command += ["--run-config", run_config]
    run_id: int | None = None
    results_dir: Path | None = None
    log_file = log_path.open("w") if log_path else None
    try:
        process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            if log_file:
                log_file.write(line)
            if run_id is None and (match := RUN_ID_PATTERN.search(line)):
                run_id = int(match.group(1))
            if match := RESULTS_PATTERN.search(line):
                results_dir = Path(match.group(1))
        returncode = process.wait()
        status = run_status(flwr, run_id, env) if run_id is not None else "unknown (no run id)"
    finally:
        if log_file:
            log_file.close()
        stop_processes(superlink_pids(launch_id=launch_id))
        if private_home:
            shutil.rmtree(flwr_home, ignore_errors=True)
    ok = returncode == 0 and status == "finished:completed"
    return (0 if ok else 1), status, results_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run-config", default="", help="TOML overrides, e.g. \"strategy='fedavg'\""
    )
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--federation-config", default="", help="overrides --num-supernodes")
    parser.add_argument("--log", type=Path, default=None, help="also write the run's log here")
    args = parser.parse_args(argv)
    code, status, results_dir = launch(
        args.run_config, args.num_supernodes, args.federation_config, log_path=args.log
    )
    print(f"\nrun status: {status}")
    if results_dir is not None:
        print(f"results: {results_dir}/rounds.csv and {results_dir}/summary.json")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
