"""Start the SuperLink of a deployment: TLS, SuperNode authentication, no dependency installs.

One port carries all of the SuperLink's APIs in Flower 1.41 (Fleet for SuperNodes, Control for
the ``flwr`` CLI, and the Runtime API its own ServerApp processes use). The SuperLink binds
``127.0.0.1`` unless told otherwise: SuperNodes on other machines need ``--host 0.0.0.0`` (or
the address of the interface they reach), and a firewall rule admitting that TCP port.

- TLS is on (``--ssl-*`` from ``deploy.certs``); a client that dials without TLS is refused.
- ``--enable-supernode-auth``: only SuperNodes whose public key was registered with
  ``flwr supernode register`` may join (``deploy.nodes register``).
- ``--disable-runtime-dependency-installation``: the app's dependencies are installed on every
  machine beforehand (``pip install -e .``); otherwise each run would ``uv sync`` them from the
  network, which fails offline and costs minutes online.
- ``--database``: registrations and run history survive a restart of the SuperLink (in memory,
  every SuperNode would have to be registered again).

    python -m deploy.superlink --certs certs/ --host 0.0.0.0 --port 8000 --database state.db
"""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from deploy.certs import CA_CERT, SERVER_CERT, SERVER_KEY
from deploy.cliconfig import default_flwr_home
from deploy.procs import VENV_BIN

DEFAULT_PORT = 8000


def superlink_command(
    certs: Path,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    database: Path | None = None,
    supernode_auth: bool = True,
) -> list[str]:
    """The ``flower-superlink`` command line; ``certs`` is a ``deploy.certs`` folder."""
    for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
        if not (certs / name).is_file():
            raise FileNotFoundError(f"{certs / name} is missing: run `python -m deploy.certs`")
    command = [
        "flower-superlink",
        "--ssl-ca-certfile", str(certs / CA_CERT),
        "--ssl-certfile", str(certs / SERVER_CERT),
        "--ssl-keyfile", str(certs / SERVER_KEY),
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip
    if supernode_auth:
        command.append("--enable-supernode-auth")
    if database is not None:
        command += ["--database", str(database)]
    return command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.superlink",
        description="Start a SuperLink with TLS and SuperNode authentication (runs until stopped).",
    )
    parser.add_argument("--certs", type=Path, required=True, help="folder made by deploy.certs")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind; 0.0.0.0 for other machines"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="the one port of all APIs")
    parser.add_argument(
        "--database",
        type=Path,
        default=default_flwr_home() / "superlink-state.db",
        help="state file (default: $FLWR_HOME/superlink-state.db)",
    )
    parser.add_argument(
        "--no-supernode-auth", action="store_true", help="admit any SuperNode (not recommended)"
    )
    parser.add_argument("--print-only", action="store_true", help="print the command, do not run")
    args = parser.parse_args(argv)
    command = superlink_command(
        args.certs.resolve(),
        host=args.host,
        port=args.port,
        database=args.database.resolve(),
        supernode_auth=not args.no_supernode_auth,
    )
    print(shlex.join(command), flush=True)
    if args.print_only:
        return 0
    args.database.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.execvpe(command[0], command, env)  # replaces this process: signals reach the SuperLink


if __name__ == "__main__":
    raise SystemExit(main())
