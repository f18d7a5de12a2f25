"""Several "hosts" on one machine: Linux network namespaces joined by a bridge.

Loopback hides the mistakes a real deployment makes: a SuperLink bound to ``127.0.0.1`` (its
default), a certificate without the address clients dial, traffic that never crosses an
interface. Here every host is a network namespace with its own ``eth0`` (a veth pair) and its own
loopback, and all ``eth0`` peers are plugged into one bridge that lives in a further, private
"switch" namespace. Nothing is added to the machine's own network namespace: no interface, route
or firewall rule, so the lab cannot collide with the machine's networks or with a second lab.

Needs root (or CAP_SYS_ADMIN + CAP_NET_ADMIN) and iproute2's ``ip``; ``unavailable_reason`` says
why a lab cannot be made here, for tests to skip with.

    sudo python -m deploy.netns --hosts superlink,node0,node1 --keep   # make one and print it
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SUBNET = "10.77.0.0/24"


class NetnsError(RuntimeError):
    """An ``ip`` or ``tc`` command failed (the message carries its output)."""


def _tc(namespace: str, *args: str) -> None:
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, "tc", *args], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise NetnsError(f"tc {' '.join(args)} (in {namespace}): {result.stderr.strip()}")


def tbf_arguments(mbps: float) -> list[str]:
    """A token bucket at ``mbps`` Mbit/s: bursts of 10 ms of traffic (at least 32 KB, so a
    fast link is not held below its rate by the kernel's timer granularity) and a queue of one
    second of traffic (TCP backs off at a full queue, as on a real bottleneck)."""
    bytes_per_second = mbps * 1e6 / 8
    burst = max(32 * 1024, int(bytes_per_second / 100))
    limit = max(2 * burst, int(bytes_per_second))
    return ["tbf", "rate", f"{mbps * 1000:.3f}kbit", "burst", str(burst), "limit", str(limit)]


def _ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {(result.stderr or result.stdout).strip()}")
    return result.stdout


def unavailable_reason() -> str | None:
    """None when namespaces can be made here, else why not (for ``pytest.skip``)."""
    if not Path("/proc/self/ns/net").exists():
        return "this kernel has no network namespaces (/proc/self/ns/net missing)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"cflprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except NetnsError as err:
        return f"cannot create a network namespace here: {err}"
    try:
        _ip("-n", probe, "link", "add", "name", "br0", "type", "bridge")
        _ip("-n", probe, "link", "add", "name", "v0", "type", "veth", "peer", "name", "v1")
    except NetnsError as err:
        return f"cannot create bridges or veth pairs here: {err}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def shaping_unavailable_reason(delay: bool = False) -> str | None:
    """None when links can be rate-limited here (``tc`` with ``tbf``; with ``delay``, also
    ``netem`` for RTT), else why not."""
    if reason := unavailable_reason():
        return reason
    if shutil.which("tc") is None:
        return "iproute2's `tc` command is not installed"
    probe = f"cflprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
        _tc(probe, "qdisc", "add", "dev", "lo", "root", *tbf_arguments(1.0))
        if delay:
            _tc(probe, "qdisc", "replace", "dev", "lo", "root", "netem", "delay", "10ms")
    except NetnsError as err:
        return f"cannot shape links here: {err}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


@dataclass(frozen=True)
class Host:
    """One namespace: ``address`` is its ``eth0`` IP on the lab's subnet."""

    name: str
    namespace: str
    address: str

    def wrap(self, command: Sequence[str]) -> list[str]:
        """``command`` run inside this host's network namespace."""
        return ["ip", "netns", "exec", self.namespace, *command]


class Lab:
    """Hosts on one switch. ``with Lab([...]) as lab:`` removes every namespace on exit.

    Processes must be stopped before the lab is removed: a namespace with a process in it
    lives on after ``ip netns del`` until that process ends.
    """

    def __init__(self, host_names: Sequence[str], subnet: str = DEFAULT_SUBNET) -> None:
        if len(set(host_names)) != len(host_names) or not host_names:
            raise ValueError(f"host names must be distinct and non-empty: {host_names}")
        network = ipaddress.ip_network(subnet)
        addresses = list(network.hosts())
        if len(addresses) < len(host_names):
            raise ValueError(f"{subnet} has room for {len(addresses)} hosts only")
        # A random tag keeps two labs (two test runs) on one machine apart.
        self.tag = f"cfl{secrets.token_hex(3)}"
        self.prefix_len = network.prefixlen
        self.switch = f"{self.tag}-switch"
        self.hosts = {
            name: Host(name, f"{self.tag}-{name}", str(addresses[index]))
            for index, name in enumerate(host_names)
        }
        #: host -> its switch port (the other end of its ``eth0``).
        self.ports = {name: f"port{index}" for index, name in enumerate(host_names)}
        self.created: list[str] = []
        #: (namespace, device) pairs that carry a qdisc of ours (``shape``).
        self.shaped: list[tuple[str, str]] = []

    def __enter__(self) -> Lab:
        self.create()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def create(self) -> None:
        """Make the switch, the hosts and their links; on failure, remove what was made."""
        try:
            self._add_namespace(self.switch)
            _ip("-n", self.switch, "link", "add", "name", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for index, host in enumerate(self.hosts.values()):
                self._add_namespace(host.namespace)
                port = f"port{index}"
                # Both ends are created inside namespaces: interface names never clash with the
                # machine's own, and deleting a namespace deletes its links.
                _ip(
                    "-n", self.switch, "link", "add", "name", port, "type", "veth",
                    "peer", "name", "eth0", "netns", host.namespace,
                )  # fmt: skip
                _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
                _ip(
                    "-n", host.namespace, "addr", "add",
                    f"{host.address}/{self.prefix_len}", "dev", "eth0",
                )  # fmt: skip
                _ip("-n", host.namespace, "link", "set", "eth0", "up")
                # Flower's own helpers talk to their parent over 127.0.0.1.
                _ip("-n", host.namespace, "link", "set", "lo", "up")
        except BaseException:
            self.destroy()
            raise

    def shape(
        self, host: str, up_mbps: float, down_mbps: float, rtt_ms: float = 0.0, loss: float = 0.0
    ) -> None:
        """Put ``host`` behind a link: ``up_mbps`` on what it sends (its ``eth0``), ``down_mbps``
        on what it receives (its switch port), each direction delayed by half of ``rtt_ms`` and
        losing ``loss`` percent of packets (``netem``, where the kernel has it; a rate alone
        needs only ``tbf``)."""
        if up_mbps <= 0 or down_mbps <= 0 or rtt_ms < 0 or not 0 <= loss < 100:
            raise ValueError(f"bad link: {up_mbps}/{down_mbps} Mbit/s, {rtt_ms} ms, {loss}%")
        ends = (
            (self.hosts[host].namespace, "eth0", up_mbps),
            (self.switch, self.ports[host], down_mbps),
        )
        for namespace, device, mbps in ends:
            self.unshape_device(namespace, device)
            if rtt_ms > 0 or loss > 0:
                netem = ["netem", "delay", f"{rtt_ms / 2:.3f}ms"]
                netem += ["loss", f"{loss}%"] if loss > 0 else []
                _tc(namespace, "qdisc", "add", "dev", device, "root", "handle", "1:", *netem)
                self.shaped.append((namespace, device))
                _tc(namespace, "qdisc", "add", "dev", device, "parent", "1:", "handle", "2:",
                    *tbf_arguments(mbps))  # fmt: skip
            else:
                _tc(namespace, "qdisc", "add", "dev", device, "root", *tbf_arguments(mbps))
                self.shaped.append((namespace, device))

    def unshape_device(self, namespace: str, device: str) -> None:
        """Remove our qdisc from ``device`` (idempotent; the device's default returns)."""
        if (namespace, device) in self.shaped:
            subprocess.run(
                ["ip", "netns", "exec", namespace, "tc", "qdisc", "del", "dev", device, "root"],
                capture_output=True,
                check=False,
            )
            self.shaped.remove((namespace, device))

    def qdiscs(self, host: str) -> tuple[str, str]:
        """``tc qdisc show`` of ``host``'s ``eth0`` and of its switch port."""

        def show(namespace: str, device: str) -> str:
            return subprocess.run(
                ["ip", "netns", "exec", namespace, "tc", "qdisc", "show", "dev", device],
                capture_output=True,
                text=True,
                check=False,
            ).stdout

        return show(self.hosts[host].namespace, "eth0"), show(self.switch, self.ports[host])

    def _add_namespace(self, namespace: str) -> None:
        _ip("netns", "add", namespace)
        self.created.append(namespace)

    def destroy(self) -> None:
        """Remove every qdisc and delete every namespace this lab made (idempotent)."""
        for namespace, device in list(self.shaped):
            self.unshape_device(namespace, device)
        while self.created:
            namespace = self.created.pop()
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)

    def exists(self) -> bool:
        """Whether any of this lab's namespaces is still listed by ``ip netns``."""
        listed = _ip("netns", "list")
        return any(line.split()[0].startswith(self.tag) for line in listed.splitlines() if line)

    def interface_counters(self, host: str) -> tuple[int, int]:
        """(received, sent) bytes of ``host``'s ``eth0``: proof that traffic crossed it."""
        namespace = self.hosts[host].namespace
        base = "/sys/class/net/eth0/statistics"
        output = subprocess.run(
            ["ip", "netns", "exec", namespace, "cat", f"{base}/rx_bytes", f"{base}/tx_bytes"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return int(output[0]), int(output[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.netns", description=__doc__)
    parser.add_argument("--hosts", default="superlink,node0,node1", help="comma-separated names")
    parser.add_argument("--subnet", default=DEFAULT_SUBNET)
    parser.add_argument(
        "--keep", action="store_true", help="leave the namespaces (remove with `ip netns del`)"
    )
    args = parser.parse_args(argv)
    if reason := unavailable_reason():
        print(f"cannot make a lab here: {reason}")
        return 1
    lab = Lab(args.hosts.split(","), args.subnet)
    lab.create()
    for host in lab.hosts.values():
        print(f"{host.name}: {host.address}  (ip netns exec {host.namespace} <command>)")
    if not args.keep:
        lab.destroy()
        print("removed (pass --keep to leave it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
