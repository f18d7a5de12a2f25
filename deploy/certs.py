"""Key material of a deployment: a CA, the SuperLink's TLS certificate, SuperNode key pairs.

TLS: SuperNodes and the ``flwr`` CLI verify the SuperLink against a CA certificate they are
given (``--root-certificates`` / ``root-certificates``), and check that the address they dial is
one of the server certificate's subject alternative names (SAN). A certificate made for
``localhost`` alone is therefore refused by a SuperNode dialling ``10.0.0.5:8000``: list every
host name and IP that clients use with ``--host``. ``localhost``, ``127.0.0.1`` and ``::1`` are
always included so that the SuperLink's machine can reach itself (CLI on the same host, tests).

SuperNode authentication: each SuperNode holds an ECDSA private key (SSH format, NIST P-384 as
``ssh-keygen -t ecdsa -b 384`` makes it); the SuperLink only admits nodes whose public key was
registered with ``flwr supernode register``. Private keys stay on their node, only ``*.pub`` files
travel to whoever registers nodes.

The ``openssl`` and ``ssh-keygen`` command-line tools are used when present (what an operator
would run by hand, and what auditors expect); otherwise the same files are made with the Python
``cryptography`` package, which Flower itself depends on, so this module works on any machine
where Flower is installed.

Re-running is safe: an existing CA and existing node keys are kept (re-creating the CA would
invalidate every certificate already handed out, a new node key would invalidate its
registration); the server certificate is issued again from the CA, since clients trust the CA
and not the certificate. ``--force`` re-creates everything.

Private keys are born with mode 0600 (``core.files.atomic_file``: a 0600 temporary file in
the same folder, then renamed; both tools write into a private temporary folder first), so no key
is ever readable by others, and no write goes through a symlink planted at a key's path. A kept
key that group or others may read is refused (``KeyPermissionError``): it may have leaked, and
reusing it silently would hide that.

    python -m deploy.certs certs/ --host superlink.example.org --host 10.0.0.5 --nodes 3
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.files import atomic_file

#: Names every server certificate carries: the SuperLink's own machine must always reach it.
LOCAL_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
#: Validity of the CA and the server certificate.
DEFAULT_DAYS = 365
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
BACKENDS = ("auto", "cli", "python")


class CertificateError(RuntimeError):
    """Making a key or certificate failed (the message carries the tool's own output)."""


class KeyPermissionError(CertificateError):
    """An existing private key that group or others may access: refused, not reused."""


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's key pair: the private key stays on the node, the public one is registered."""

    name: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class KeyMaterial:
    """Everything ``make_all`` wrote; paths are absolute."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    subject_names: tuple[str, ...]
    nodes: tuple[NodeKey, ...] = field(default_factory=tuple)


def cli_tools_available() -> bool:
    """Whether ``openssl`` and ``ssh-keygen`` are both on ``PATH``."""
    return shutil.which("openssl") is not None and shutil.which("ssh-keygen") is not None


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``cli`` when the command-line tools exist, else ``python``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "cli" if cli_tools_available() else "python"
    if backend == "cli" and not cli_tools_available():
        raise CertificateError("backend 'cli' needs openssl and ssh-keygen on PATH")
    return backend


def subject_names(hosts: Iterable[str] = ()) -> tuple[str, ...]:
    """The local names followed by ``hosts``, de-duplicated, order kept, IPs normalised."""
    names: list[str] = []
    for host in (*LOCAL_NAMES, *hosts):
        host = host.strip()
        if not host:
            continue
        try:
            host = str(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            host = host.lower()
        if host not in names:
            names.append(host)
    return tuple(names)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def san_entries(names: Iterable[str]) -> list[str]:
    """OpenSSL ``subjectAltName`` entries: ``IP:`` for addresses, ``DNS:`` for host names."""
    return [f"IP:{name}" if _is_ip(name) else f"DNS:{name}" for name in names]


def _run(command: Sequence[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise CertificateError(
            f"{' '.join(command)} failed ({result.returncode}): "
            f"{(result.stderr or result.stdout).strip()}"
        )


def _write(path: Path, data: bytes, private: bool) -> None:
    """Every output goes through here: private keys 0600 from birth, certificates 0644."""
    with atomic_file(path, 0o600 if private else 0o644) as handle:
        handle.write(data)


def check_private(path: Path) -> None:
    """Refuse a private key whose mode grants group/other anything (ssh-keygen does the same)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyPermissionError(
            f"{path}: private key has mode {mode:04o}, readable beyond its owner; "
            f"run chmod 600 {path} if it did not leak, else re-create it with --force"
        )


# ----------------------------------------------------------------------------- openssl backend
_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = {cn}
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = {san}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _openssl_config(tmp: Path, cn: str, names: Sequence[str] = ("localhost",)) -> Path:
    # An explicit config keeps the result independent of the system's openssl.cnf defaults.
    path = tmp / "openssl.cnf"
    path.write_text(_OPENSSL_CONFIG.format(cn=cn, san=", ".join(san_entries(names))))
    return path


# The tools write into a TemporaryDirectory (mode 0700, ours), never to the destination: openssl
# keeps the mode of a file already at -keyout and follows a symlink there, ssh-keygen asks before
# overwriting. The bytes then go through ``_write``, as the Python backend's do.
def _cli_ca(days: int) -> tuple[bytes, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        config = _openssl_config(Path(tmp), "commfl deployment CA")
        key, cert = Path(tmp) / CA_KEY, Path(tmp) / CA_CERT
        _run(
            [
                "openssl", "req", "-x509", "-config", str(config), "-extensions", "ca_ext",
                "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384", "-nodes",
                "-keyout", str(key), "-out", str(cert), "-days", str(days), "-sha384",
            ]
        )  # fmt: skip
        return cert.read_bytes(), key.read_bytes()


def _cli_server(
    ca_cert: Path, ca_key: Path, names: Sequence[str], days: int
) -> tuple[bytes, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        config = _openssl_config(Path(tmp), names[0], names)
        key, csr, cert = Path(tmp) / SERVER_KEY, Path(tmp) / "server.csr", Path(tmp) / SERVER_CERT
        _run(
            [
                "openssl", "req", "-new", "-config", str(config),
                "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384", "-nodes",
                "-keyout", str(key), "-out", str(csr),
            ]
        )  # fmt: skip
        _run(
            [
                "openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert),
                "-CAkey", str(ca_key), "-set_serial", f"0x{secrets.token_hex(16)}",
                "-days", str(days), "-sha384", "-extfile", str(config),
                "-extensions", "server_ext", "-out", str(cert),
            ]
        )  # fmt: skip
        return cert.read_bytes(), key.read_bytes()


def _cli_node_key(name: str) -> tuple[bytes, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        private = Path(tmp) / "key"
        _run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", name,
              "-f", str(private)])  # fmt: skip
        return private.read_bytes(), private.with_name("key.pub").read_bytes()


# ----------------------------------------------------------------------------- python backend
def _py_pem(key: object, certificate: object) -> tuple[bytes, bytes]:
    """(certificate, PKCS#8 private key) as PEM, as openssl writes them."""
    from cryptography.hazmat.primitives import serialization

    key_pem = key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem  # type: ignore[attr-defined]


def _py_certificate(
    subject_cn: str,
    public_key: object,
    issuer: object | None,
    signing_key: object,
    days: int,
    names: Sequence[str] | None,
) -> object:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    now = datetime.datetime.now(datetime.UTC)
    is_ca = names is None
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)  # type: ignore[arg-type]
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key),  # type: ignore[arg-type]
            critical=False,
        )
    )
    usage = dict.fromkeys(
        (
            "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
            "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
        ),
        False,
    )  # fmt: skip
    if is_ca:
        usage.update(key_cert_sign=True, crl_sign=True)
    else:
        usage.update(digital_signature=True)  # ECDSA keys sign, never encipher
        alt_names = [
            x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n)
            for n in names or ()
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                signing_key.public_key()  # type: ignore[attr-defined]
            ),
            critical=False,
        )
    builder = builder.add_extension(x509.KeyUsage(**usage), critical=True)
    return builder.sign(signing_key, hashes.SHA384())  # type: ignore[arg-type]


def _py_ca(days: int) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP384R1())
    certificate = _py_certificate(
        "commfl deployment CA", private.public_key(), None, private, days, None
    )
    return _py_pem(private, certificate)


def _py_server(ca_cert: Path, ca_key: Path, names: Sequence[str], days: int) -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signing_key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    private = ec.generate_private_key(ec.SECP384R1())
    certificate = _py_certificate(
        names[0], private.public_key(), ca.subject, signing_key, days, names
    )
    return _py_pem(private, certificate)


def _py_node_key(name: str) -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + f" {name}\n".encode()


# ----------------------------------------------------------------------------- public API
def make_ca(directory: Path, days: int = DEFAULT_DAYS, backend: str = "auto") -> tuple[Path, Path]:
    """Create ``ca.crt`` / ``ca.key`` in ``directory``; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / CA_CERT, directory / CA_KEY
    cert_pem, key_pem = (_cli_ca if resolve_backend(backend) == "cli" else _py_ca)(days)
    _write(key, key_pem, private=True)
    _write(cert, cert_pem, private=False)
    return cert, key


def make_server_certificate(
    directory: Path,
    hosts: Iterable[str] = (),
    days: int = DEFAULT_DAYS,
    backend: str = "auto",
) -> tuple[Path, Path]:
    """Issue ``server.pem`` / ``server.key`` from the CA in ``directory``.

    The certificate's SANs are ``LOCAL_NAMES`` plus ``hosts`` (names and IPs clients dial).
    A CA key that group or others may read is refused (``KeyPermissionError``).
    """
    ca_cert, ca_key = directory / CA_CERT, directory / CA_KEY
    if not (ca_cert.exists() and ca_key.exists()):
        raise CertificateError(f"no CA in {directory}: run make_ca first")
    check_private(ca_key)
    names = subject_names(hosts)
    cert, key = directory / SERVER_CERT, directory / SERVER_KEY
    issue = _cli_server if resolve_backend(backend) == "cli" else _py_server
    cert_pem, key_pem = issue(ca_cert, ca_key, names, days)
    _write(key, key_pem, private=True)
    _write(cert, cert_pem, private=False)
    return cert, key


def make_node_key(directory: Path, name: str, backend: str = "auto") -> NodeKey:
    """Create the ECDSA P-384 key pair ``<name>`` / ``<name>.pub`` (OpenSSH format)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad node key name {name!r}")
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / name
    public = directory / f"{name}.pub"
    private_key, public_key = (
        _cli_node_key if resolve_backend(backend) == "cli" else _py_node_key
    )(name)
    _write(private, private_key, private=True)
    _write(public, public_key, private=False)
    return NodeKey(name, private.resolve(), public.resolve())


def node_key_names(count: int, prefix: str = "supernode") -> list[str]:
    """``supernode-0`` ... ``supernode-<count-1>``: node i serves partition i."""
    return [f"{prefix}-{index}" for index in range(count)]


def make_all(
    directory: Path,
    hosts: Iterable[str] = (),
    node_names: Iterable[str] = (),
    days: int = DEFAULT_DAYS,
    backend: str = "auto",
    force: bool = False,
) -> KeyMaterial:
    """CA (kept if present unless ``force``), a fresh server certificate, node keys (kept).

    A kept private key that group or others may read is refused (``KeyPermissionError``).
    """
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca_cert, ca_key = directory / CA_CERT, directory / CA_KEY
    if force or not (ca_cert.exists() and ca_key.exists()):
        make_ca(directory, days, backend)
    hosts = list(hosts)
    server_cert, server_key = make_server_certificate(directory, hosts, days, backend)
    nodes = []
    for name in node_names:
        private, public = directory / name, directory / f"{name}.pub"
        if force or not (private.exists() and public.exists()):
            nodes.append(make_node_key(directory, name, backend))
        else:
            check_private(private)
            nodes.append(NodeKey(name, private, public))
    return KeyMaterial(
        directory, ca_cert, ca_key, server_cert, server_key, subject_names(hosts), tuple(nodes)
    )


def certificate_subject_names(cert: Path) -> list[str]:
    """The SAN entries of a PEM certificate (host names and IPs as strings)."""
    from cryptography import x509

    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return [str(name.value) for name in extension.value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.certs",
        description="Create a CA, the SuperLink's TLS certificate and SuperNode key pairs.",
    )
    parser.add_argument("directory", type=Path, help="output folder (created, mode 700)")
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        help="host name or IP clients use to reach the SuperLink (repeatable); "
        f"{', '.join(LOCAL_NAMES)} are always included",
    )
    parser.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to make")
    parser.add_argument(
        "--node-name", action="append", default=[], help="explicit SuperNode key name (repeatable)"
    )
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS)
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--force", action="store_true", help="re-create the CA and node keys")
    args = parser.parse_args(argv)
    try:
        material = make_all(
            args.directory,
            hosts=args.host,
            node_names=[*node_key_names(args.nodes), *args.node_name],
            days=args.days,
            backend=args.backend,
            force=args.force,
        )
    except (CertificateError, OSError) as err:  # an operator's problem, not a traceback
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"CA certificate (give to every SuperNode and CLI user): {material.ca_cert}")
    print(f"CA key (keep offline):                          {material.ca_key}")
    print(f"SuperLink certificate / key:                    {material.server_cert} / "
          f"{material.server_key}")  # fmt: skip
    print(f"  valid for: {', '.join(material.subject_names)}")
    for node in material.nodes:
        print(f"SuperNode {node.name}: private {node.private_key}, register {node.public_key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
