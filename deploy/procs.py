"""Processes of a deployment, started and stopped by PID; free ports; the offline environment.

Flower's long-lived processes start helpers in *new sessions* (``flower-superexec``, and through
it ``flwr-serverapp`` / ``flwr-clientapp``), so killing a process group misses them and leaves
them running after a test. ``stop_tree`` therefore snapshots the whole descendant tree from
``/proc`` before signalling anything (an orphan is re-parented and could no longer be found),
and only ever signals PIDs that descend from a process this module started: never by name, so a
colleague's SuperLink or Ray cluster on the same machine is left alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tools.launch import offline_environment

PROJECT_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def flwr_environment(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes here: offline, no telemetry, own ``FLWR_HOME``.

    Each process of a deployment gets its own ``FLWR_HOME`` (as it would on its own machine):
    installed app bundles and CLI connections are never shared by accident.
    """
    env = offline_environment(flwr_home)  # the launcher's offline settings, one source
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            # Wide, colourless output: logs are parsed and shown in test failures.
            "COLUMNS": "200",
            "NO_COLOR": "1",
        }
    )
    if extra:
        env.update(extra)
    flwr_home.mkdir(parents=True, exist_ok=True)
    return env


def children_map() -> dict[int, list[int]]:
    """Parent PID -> child PIDs of every process visible in ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first."""
    children = children_map()
    tree, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        tree.append(current)
        queue.extend(children.get(current, []))
    return tree


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_tree(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM ``pid`` and its descendants, SIGKILL whatever is left after ``timeout`` s."""
    tree = process_tree(pid)
    for target in tree:
        try:
            os.kill(target, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout
    # Children may be started during shutdown: look again before the final SIGKILL.
    while time.monotonic() < deadline and any(alive(p) for p in tree):
        time.sleep(0.1)
    for target in set(tree) | set(process_tree(pid) if alive(pid) else []):
        if alive(target):
            try:
                os.kill(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def pids_with_environment(variable: str, prefix: str) -> list[int]:
    """PIDs whose environment has ``variable`` set to a value starting with ``prefix``.

    Environments are inherited: giving every process of a deployment a ``FLWR_HOME`` inside one
    unique folder marks all its descendants, including orphans that left the process tree when
    their parent died (e.g. a ServerApp whose SuperLink was killed from outside).
    """
    needle = f"{variable}=".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        for item in environ.split(b"\0"):
            if item.startswith(needle) and item[len(needle) :].decode(errors="replace").startswith(
                prefix
            ):
                found.append(int(entry.name))
                break
    return found


def stop_marked(variable: str, prefix: str, timeout: float = 10.0) -> list[int]:
    """Stop every process marked by ``pids_with_environment``; returns the PIDs signalled."""
    marked = [pid for pid in pids_with_environment(variable, prefix) if alive(pid)]
    for pid in marked:
        stop_tree(pid, timeout)
    return marked


class ManagedProcess:
    """A long-lived process started here, logging to a file, stopped with its whole tree."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        env: Mapping[str, str],
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("wb") as log:
            # A session of its own: a Ctrl-C in the terminal reaches the test, not the SuperLink.
            self.popen = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
            )
        self.pid = self.popen.pid

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.pid})"

    def log(self) -> str:
        """The process's output so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        """Whether the process is still running; never reaps it, so its PID cannot be reused
        by a stranger before ``stop`` signals it."""
        if self.popen.returncode is not None:
            return False
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return info is None

    def wait_for_log(self, text: str, timeout: float) -> bool:
        """Wait until ``text`` appears in the log; False on timeout or if the process ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return True
            if not self.running():
                return text in self.log()
            time.sleep(0.2)
        return False

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if still running after ``timeout`` seconds."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process and every descendant (idempotent).

        A process already reaped by ``wait`` is not signalled: its PID may belong to someone else.
        """
        if self.popen.returncode is not None:
            return
        stop_tree(self.pid, timeout)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent
            pass
