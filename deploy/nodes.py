"""SuperNodes of a deployment: register their keys, and start them with their data partition.

Each SuperNode serves one data partition: the app's ClientApp reads ``partition-id`` and
``num-partitions`` from the node config (``fl_app/client_app.py``), so node ``i`` of ``n`` must
be started with ``--node-config "partition-id=i num-partitions=n"``. Per-client state (FedBiF's
virtual-bit magnitudes, EF-SignSGD's error feedback) lives in the node's ``context.state`` inside
the SuperNode process: it survives across rounds even though every message runs in a fresh
ClientApp process. With ``--state-dir`` (node config ``state-dir``) the ClientApp also keeps it in
a file there (``core.node_state``), so a SuperNode restarted mid-run carries on with it.

A SuperNode opens no port to the network. It dials the SuperLink; its ``--port`` is a local
API (bound to 127.0.0.1) between the SuperNode and its ClientApp processes, so only several
SuperNodes on one machine need different ``--port`` values.

    python -m deploy.nodes register certs/supernode-*.pub --superlink prod
    python -m deploy.nodes start --superlink 10.0.0.5:8000 --ca certs/ca.crt \\
        --key certs/supernode-0 --partition-id 0 --num-partitions 3 --state-dir /var/lib/commfl
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
from collections.abc import Mapping
from pathlib import Path

from deploy.procs import VENV_BIN

DEFAULT_PORT = 9094


class RegistrationError(RuntimeError):
    """``flwr supernode register`` did not register the key (the message says why)."""


def node_config(partition_id: int, num_partitions: int, state_dir: Path | None = None) -> str:
    """The ``--node-config`` value the app's ClientApp expects (``state-dir``: where the node
    keeps its client state across restarts)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
    config = f"partition-id={partition_id} num-partitions={num_partitions}"
    if state_dir is not None:
        if "'" in str(state_dir):
            raise ValueError(f"state-dir may not contain a single quote: {state_dir}")
        config += f" state-dir='{state_dir}'"
    return config


def supernode_command(
    superlink: str,
    partition_id: int,
    num_partitions: int,
    *,
    ca_cert: Path | None,
    private_key: Path | None,
    port: int = DEFAULT_PORT,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
    state_dir: Path | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line.

    ``ca_cert=None`` makes an insecure (no TLS) SuperNode: only for showing that a TLS SuperLink
    refuses it. ``private_key=None`` skips node authentication.
    """
    command = ["flower-supernode", "--superlink", superlink]
    if ca_cert is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(ca_cert)]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(private_key)]
    command += [
        "--node-config", node_config(partition_id, num_partitions, state_dir),
        "--port", str(port),
    ]  # fmt: skip
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        command += ["--max-wait-time", str(max_wait_time)]
    return command


def register_command(public_key: Path, superlink: str) -> list[str]:
    """``flwr supernode register``: ``superlink`` names a ``[superlink.NAME]`` CLI connection."""
    return ["flwr", "supernode", "register", str(public_key), superlink, "--format", "json"]


def registered_node_id(public_key: Path, result: subprocess.CompletedProcess[str]) -> int:
    """The node ID in ``flwr supernode register --format json`` output, or RegistrationError.

    ``flwr`` exits 0 even when the SuperLink refused: only the JSON's ``success`` says.
    """
    try:
        answer = json.loads(result.stdout)
    except json.JSONDecodeError:
        answer = {}
    if result.returncode != 0 or not answer.get("success"):
        raise RegistrationError(
            f"registering {public_key} failed: "
            f"{answer.get('error-message') or result.stderr.strip() or result.stdout.strip()}"
        )
    return int(answer["node-id"])


def register(
    public_key: Path, superlink: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> int:
    """Register one SuperNode public key; returns the node ID the SuperLink assigned."""
    result = subprocess.run(
        register_command(public_key, superlink),
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else None,
        timeout=timeout,
        check=False,
    )
    return registered_node_id(public_key, result)


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.nodes", description="Register and start SuperNodes."
    )
    sub = parser.add_subparsers(dest="action", required=True)
    reg = sub.add_parser("register", help="register public keys with the SuperLink")
    reg.add_argument("public_keys", type=Path, nargs="+", help="*.pub files from deploy.certs")
    reg.add_argument(
        "--superlink", required=True, help="CLI connection name (see deploy.cliconfig)"
    )
    start = sub.add_parser("start", help="start one SuperNode (runs until stopped)")
    start.add_argument("--superlink", required=True, help="SuperLink address HOST:PORT")
    start.add_argument("--ca", type=Path, required=True, help="CA certificate (ca.crt)")
    start.add_argument("--key", type=Path, required=True, help="this node's private key")
    start.add_argument("--partition-id", type=int, required=True)
    start.add_argument("--num-partitions", type=int, required=True)
    start.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="local API port, distinct per node"
    )
    start.add_argument(
        "--state-dir", type=Path, default=None, help="keep client state here across restarts"
    )
    start.add_argument("--print-only", action="store_true")
    args = parser.parse_args(argv)
    env = _cli_env()
    if args.action == "register":
        for key in args.public_keys:
            node_id = register(key, args.superlink, env)
            print(f"{key}: node {node_id}", flush=True)
        return 0
    command = supernode_command(
        args.superlink,
        args.partition_id,
        args.num_partitions,
        ca_cert=args.ca.resolve(),
        private_key=args.key.resolve(),
        port=args.port,
        state_dir=args.state_dir.resolve() if args.state_dir else None,
    )
    print(shlex.join(command), flush=True)
    if args.print_only:
        return 0
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    raise SystemExit(main())
