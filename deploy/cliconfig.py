"""The ``flwr`` CLI's connection to a deployed SuperLink: ``$FLWR_HOME/config.toml``.

``flwr run``, ``flwr ls`` and ``flwr supernode register`` find SuperLinks by name in
``$FLWR_HOME/config.toml`` (``~/.flwr`` by default)::

    [superlink.prod]
    address = "superlink.example.org:8000"
    root-certificates = "/abs/path/certs/ca.crt"

The address's host must be one of the server certificate's subject names (``deploy.certs
--host``), or TLS verification fails. The other entries of the file (Flower writes a ``local``
simulation connection on first use) are kept.

    python -m deploy.cliconfig prod --address superlink.example.org:8000 --ca certs/ca.crt
    flwr run . prod --stream
"""

from __future__ import annotations

import argparse
import os
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

CONFIG_FILE = "config.toml"


def default_flwr_home() -> Path:
    """``$FLWR_HOME``, else ``~/.flwr``: where the ``flwr`` CLI looks."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def connection(
    address: str, root_certificates: Path | None = None, insecure: bool = False
) -> dict[str, Any]:
    """One ``[superlink.NAME]`` table; ``insecure`` only for showing that TLS refuses it."""
    if insecure == (root_certificates is not None):
        raise ValueError("give exactly one of root_certificates (TLS) or insecure=True")
    table: dict[str, Any] = {"address": address}
    if insecure:
        table["insecure"] = True
    else:
        table["root-certificates"] = str(Path(root_certificates).resolve())  # type: ignore[arg-type]
    return table


def write_connection(
    flwr_home: Path,
    name: str,
    address: str,
    root_certificates: Path | None = None,
    insecure: bool = False,
    make_default: bool = False,
) -> Path:
    """Add or replace ``[superlink.<name>]`` in ``flwr_home/config.toml``; returns its path."""
    path = flwr_home / CONFIG_FILE
    config: dict[str, Any] = tomllib.loads(path.read_text()) if path.exists() else {}
    superlinks = config.setdefault("superlink", {})
    superlinks[name] = connection(address, root_certificates, insecure)
    if make_default or "default" not in superlinks:
        superlinks["default"] = name
    flwr_home.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.cliconfig",
        description="Add a TLS SuperLink connection to the flwr CLI's config.toml.",
    )
    parser.add_argument("name", help="connection name, used as `flwr run . NAME`")
    parser.add_argument("--address", required=True, help="SuperLink HOST:PORT")
    parser.add_argument("--ca", type=Path, required=True, help="CA certificate (ca.crt)")
    parser.add_argument("--flwr-home", type=Path, default=None, help="default: $FLWR_HOME")
    parser.add_argument("--default", action="store_true", help="make it the default connection")
    args = parser.parse_args(argv)
    path = write_connection(
        args.flwr_home or default_flwr_home(),
        args.name,
        args.address,
        root_certificates=args.ca,
        make_default=args.default,
    )
    print(f"wrote [superlink.{args.name}] to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
