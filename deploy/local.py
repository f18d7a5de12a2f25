"""A whole deployment on this machine: SuperLink, SuperNodes and CLI user as separate "hosts".

This is the deployment of the README's "Deploying on separate machines" section, run by one
command: the same certificates (``deploy.certs``), the same SuperLink and SuperNode command lines
(``deploy.superlink``, ``deploy.nodes``), the same CLI configuration (``deploy.cliconfig``). Each
role gets its own ``FLWR_HOME`` as it would on its own machine. Given a ``deploy.netns.Lab``,
each role also gets its own network namespace, so the SuperLink must bind a routable address
and every byte crosses a (virtual) Ethernet interface; otherwise all run on loopback, on free
ports so that a ``make run`` SuperLink on 39091 is never disturbed.

Every process is started here and stopped here by PID with its whole tree (``deploy.procs``);
``LocalFederation`` is a context manager, so a failing test still cleans up.

It is also the place that compares Flower's own traffic report (``flwr ls --format json``,
``network-traffic``, deployment only) with the app's byte accounting (``summary.json``):
see ``TrafficComparison``.

    python -m deploy.local --nodes 3 --run-config "strategy='fedbif' num-server-rounds=2"
    sudo python -m deploy.local --netns --nodes 2
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.link import PROFILES, ClientLink, LinkProfile, client_link
from deploy import certs as certs_module
from deploy.cliconfig import write_connection
from deploy.netns import Lab, shaping_unavailable_reason
from deploy.nodes import register_command, registered_node_id, supernode_command
from deploy.procs import (
    PROJECT_ROOT,
    ManagedProcess,
    flwr_environment,
    pids_with_environment,
    process_tree,
    stop_marked,
)
from deploy.relay import relay_command
from deploy.superlink import superlink_command
from tools.launch import free_port

#: the port a node's relay listens on inside its own namespace.
RELAY_PORT = 9301

RUN_ID_PATTERN = re.compile(r"run (?:ID )?(\d{3,})", re.IGNORECASE)
#: CLI connection names written into the user's ``config.toml``.
TLS_CONNECTION = "deploy"
INSECURE_CONNECTION = "deploy-insecure"
SUPERLINK_READY = "Uvicorn running on https://"
SUPERNODE_READY = "SuperNode ID:"
#: Flower's envelope around a message's tensor bytes (``TrafficComparison``), per message and
#: per array. Measured here (digits CNN): ~2.0 KB per message plus ~0.33-0.48 KB per array
#: (FedBiF: +2.5 KB up with 2 arrays, +3.0 KB down with 3; EF-SignSGD: +6.6 KB down with 14).
ENVELOPE_PER_MESSAGE = 3 * 1024
ENVELOPE_PER_ARRAY = 640


class DeploymentError(RuntimeError):
    """A process of the deployment did not come up or a run did not complete."""


@dataclass(frozen=True)
class TrafficComparison:
    """Flower's run traffic (Fleet API, SuperLink side) against the app's payload bytes.

    Flower counts, per run, the protobuf sizes of the SuperNodes' pull/push requests and
    responses and the content of every object pulled or pushed (``fleet_handlers.py``); HTTP
    and TLS framing are not counted. A classic-API message becomes an object tree: the message
    (metadata, config or metrics record) and, per tensor, an ``Array`` object (dtype, shape, ids
    of its chunks) and an ``ArrayChunk`` holding exactly the tensor's ``.npy`` bytes, every
    object named by a 64-character hash in its parent and in the request. The app counts those
    ``.npy`` bytes only (``Parameters.tensors``). Hence, per direction, with ``a`` arrays per
    message::

        app_bytes <= flower_bytes <= app_bytes + messages * (ENVELOPE_PER_MESSAGE
                                                             + a * ENVELOPE_PER_ARRAY)

    Flower's inbound is what SuperNodes sent (uplink), outbound what they received (downlink).
    """

    app_uplink: int
    app_downlink: int
    uplink_messages: int
    downlink_messages: int
    flower_inbound: int
    flower_outbound: int

    @classmethod
    def of(cls, run: dict[str, Any], summary: dict[str, Any]) -> TrafficComparison:
        traffic = run["network-traffic"]
        return cls(
            app_uplink=int(summary["uplink_bytes"]),
            app_downlink=int(summary["downlink_bytes"]),
            uplink_messages=int(summary["uplink_messages"]),
            downlink_messages=int(summary["downlink_messages"]),
            flower_inbound=int(traffic["inbound-bytes"]),
            flower_outbound=int(traffic["outbound-bytes"]),
        )

    @property
    def uplink_overhead_per_message(self) -> float:
        return (self.flower_inbound - self.app_uplink) / max(1, self.uplink_messages)

    @property
    def downlink_overhead_per_message(self) -> float:
        return (self.flower_outbound - self.app_downlink) / max(1, self.downlink_messages)

    def problems(self, uplink_arrays: int, downlink_arrays: int) -> list[str]:
        """Violations of the bound above, given the arrays per message (empty: they agree)."""
        found = []
        for direction, app, flower, messages, arrays in (
            ("uplink", self.app_uplink, self.flower_inbound, self.uplink_messages, uplink_arrays),
            (
                "downlink",
                self.app_downlink,
                self.flower_outbound,
                self.downlink_messages,
                downlink_arrays,
            ),
        ):
            envelope = ENVELOPE_PER_MESSAGE + arrays * ENVELOPE_PER_ARRAY
            if messages <= 0 or app <= 0:
                found.append(f"{direction}: the app counted no traffic ({app} B, {messages} msgs)")
            elif not app <= flower <= app + messages * envelope:
                found.append(
                    f"{direction}: Flower {flower} B not in [app {app} B, app + {messages} "
                    f"messages x {envelope} B = {app + messages * envelope} B]"
                )
        return found

    def report(self) -> str:
        return (
            f"uplink: app {self.app_uplink} B in {self.uplink_messages} messages, Flower inbound "
            f"{self.flower_inbound} B (+{self.uplink_overhead_per_message:.0f} B/message, "
            f"x{self.flower_inbound / max(1, self.app_uplink):.3f}); "
            f"downlink: app {self.app_downlink} B in {self.downlink_messages} messages, Flower "
            f"outbound {self.flower_outbound} B (+{self.downlink_overhead_per_message:.0f} "
            f"B/message, x{self.flower_outbound / max(1, self.app_downlink):.3f})"
        )


@dataclass(frozen=True)
class RunResult:
    """One ``flwr run`` on the deployment."""

    run_id: int | None
    returncode: int
    log: str
    info: dict[str, Any]  # this run's entry of ``flwr ls --format json`` ({} if unknown)

    @property
    def status(self) -> str:
        return str(self.info.get("status", "unknown"))


class LocalFederation:
    """A SuperLink with TLS and node authentication, ``num_nodes`` SuperNodes and a CLI user."""

    def __init__(
        self,
        workdir: Path,
        num_nodes: int,
        lab: Lab | None = None,
        cert_backend: str = "auto",
    ) -> None:
        if num_nodes < 1:
            raise ValueError("num_nodes must be >= 1")
        self.workdir = workdir.resolve()
        self.num_nodes = num_nodes
        self.lab = lab
        self.processes: list[ManagedProcess] = []
        if lab is None:
            self.superlink_ip = "127.0.0.1"
            self.port = free_port()
            self.node_ports = [free_port() for _ in range(num_nodes)]
        else:
            # Own network stack per host: Flower's default ports, as on real machines.
            self.superlink_ip = lab["superlink"].address
            self.port = 8000
            self.node_ports = [9094] * num_nodes
        self.address = f"{self.superlink_ip}:{self.port}"
        #: a kernel without netem: each node dials the SuperLink through a delaying relay in
        #: its namespace (``deploy.relay``), whose delay ``shape_links`` sets to RTT / 2.
        self.relays = lab is not None and shaping_unavailable_reason(delay=True) is not None
        # One spare key that is never registered: the SuperLink must refuse it.
        self.material = certs_module.make_all(
            self.workdir / "certs",
            hosts=[self.superlink_ip],
            node_names=[*certs_module.node_key_names(num_nodes), "unregistered"],
            backend=cert_backend,
        )
        self.user_env = flwr_environment(self.workdir / "user-home", {"OMP_NUM_THREADS": "1"})
        write_connection(
            self.workdir / "user-home",
            TLS_CONNECTION,
            self.address,
            root_certificates=self.material.ca_cert,
            make_default=True,
        )
        write_connection(
            self.workdir / "user-home", INSECURE_CONNECTION, self.address, insecure=True
        )

    @staticmethod
    def lab_hosts(num_nodes: int) -> list[str]:
        """The hosts a ``Lab`` for this federation needs."""
        return ["superlink", "user", *(f"node{i}" for i in range(num_nodes))]

    # ------------------------------------------------------------------ context management
    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def pids(self) -> set[int]:
        """Every live PID this federation started, helpers (SuperExec, app processes) included."""
        started = {
            pid
            for process in self.processes
            if process.running()
            for pid in process_tree(process.pid)
        }
        return started | set(pids_with_environment("FLWR_HOME", f"{self.workdir}/"))

    def stop(self) -> None:
        """Stop every process started here (SuperNodes first), whole trees, by PID; then any
        orphan that still carries this federation's ``FLWR_HOME`` (all of them live inside
        ``workdir``)."""
        while self.processes:
            self.processes.pop().stop()
        stop_marked("FLWR_HOME", f"{self.workdir}/")

    # ------------------------------------------------------------------ helpers
    def _wrap(self, host: str, command: list[str]) -> list[str]:
        return command if self.lab is None else self.lab[host].wrap(command)

    def _start(
        self, name: str, host: str, command: list[str], home: str, cwd: Path | None = None
    ) -> ManagedProcess:
        env = flwr_environment(self.workdir / home, {"OMP_NUM_THREADS": "1"})
        process = ManagedProcess(
            name, self._wrap(host, command), self.workdir / "logs" / f"{name}.log", env, cwd
        )
        self.processes.append(process)
        return process

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` as the CLI user (own ``FLWR_HOME``, own host under netns)."""
        return subprocess.run(
            self._wrap("user", ["flwr", *args]),
            cwd=PROJECT_ROOT,
            env=self.user_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def list_runs(self, connection: str = TLS_CONNECTION) -> dict[str, Any]:
        """``flwr ls CONNECTION --format json`` parsed (``success`` false on refusal)."""
        result = self.cli("ls", connection, "--format", "json")
        try:
            return dict(json.loads(result.stdout))
        except json.JSONDecodeError:
            return {"success": False, "error-message": result.stdout + result.stderr}

    def shape_links(self, profile: LinkProfile, seed: int) -> dict[int, ClientLink]:
        """Put SuperNode ``i`` behind the link the link model gives partition ``i`` under
        ``profile`` and ``seed`` (``core.link.client_link``), so a run with the same
        ``link-profile`` and seed models exactly the links it runs on. Needs a ``Lab``; the lab
        removes the qdiscs with its namespaces."""
        if self.lab is None:
            raise DeploymentError("shaped links need network namespaces (a Lab, --netns)")
        links = {i: client_link(profile, seed, i) for i in range(self.num_nodes)}
        for index, link in links.items():
            rtt_ms = 1e3 * link.rtt_s
            if self.relays:  # no netem here: the rate from tbf, the RTT from the node's relay
                self._relay_delay_file(index).write_text(f"{rtt_ms / 2:.3f}\n")
                rtt_ms = 0.0
            self.lab.shape(f"node{index}", link.up_mbps, link.down_mbps, rtt_ms)
        return links

    def unshape_links(self) -> None:
        """Links back to unshaped: qdiscs removed, relays at no delay."""
        if self.lab is not None:
            for namespace, device in list(self.lab.shaped):
                self.lab.unshape_device(namespace, device)
        for index in range(self.num_nodes):
            if self.relays:
                self._relay_delay_file(index).write_text("0\n")

    def _relay_delay_file(self, index: int) -> Path:
        return self.workdir / f"relay-{index}.delay-ms"

    # ------------------------------------------------------------------ the deployment
    def start_superlink(self, timeout: float = 60) -> ManagedProcess:
        """Start the SuperLink (binding 0.0.0.0 under netns, as for other machines)."""
        command = superlink_command(
            self.material.directory,
            host="127.0.0.1" if self.lab is None else "0.0.0.0",
            port=self.port,
            database=self.workdir / "superlink-state.db",
        )
        process = self._start("superlink", "superlink", command, "superlink-home")
        ready = process.wait_for_log(SUPERLINK_READY, timeout)
        if not ready and not process.running() and (process.wait(0) or 0) < 0:
            # Killed by a signal while starting (seen once in CI, sender unknown): one retry.
            self.processes.remove(process)
            process = self._start("superlink", "superlink", command, "superlink-home")
            ready = process.wait_for_log(SUPERLINK_READY, timeout)
        if not ready:
            code = None if process.running() else process.wait(0)
            raise DeploymentError(
                f"SuperLink did not start (exit code {code}; -15 = SIGTERM from another "
                f"process):\n{process.log()[-3000:]}"
            )
        return process

    def register_nodes(self, indices: list[int] | None = None) -> list[int]:
        """Register the public keys of nodes ``indices`` (default all); returns node IDs.

        The ``flwr`` calls run side by side: each spends seconds importing the CLI.
        """
        keys = [
            self.material.nodes[i].public_key
            for i in (range(self.num_nodes) if indices is None else indices)
        ]
        calls = [
            subprocess.Popen(
                self._wrap("user", register_command(key, TLS_CONNECTION)),
                cwd=PROJECT_ROOT,
                env=self.user_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for key in keys
        ]
        node_ids = []
        for key, call in zip(keys, calls, strict=True):
            stdout, stderr = call.communicate(timeout=120)
            result = subprocess.CompletedProcess(call.args, call.returncode, stdout, stderr)
            node_ids.append(registered_node_id(key, result))
        return node_ids

    def start_supernode(
        self,
        index: int,
        *,
        key_name: str | None = None,
        tls: bool = True,
        ca_cert: Path | None = None,
        authenticate: bool = True,
        max_retries: int | None = None,
        name: str | None = None,
    ) -> ManagedProcess:
        """Start SuperNode ``index`` (partition ``index`` of ``num_nodes``); a regular node keeps
        its client state in ``workdir/node-state/node<index>`` (``state-dir``).

        ``key_name``, ``tls=False``, ``ca_cert`` (another CA) and ``authenticate=False`` make the
        misbehaving nodes the tests need: an unregistered key, no TLS, a foreign CA.
        """
        regular = key_name is None and tls and ca_cert is None and authenticate
        key = self.material.directory / (key_name or self.material.nodes[index].name)
        name = f"supernode-{index}" if regular else (name or f"extra-supernode-{index}")
        address = self.address
        if regular:
            host, port = f"node{index}", self.node_ports[index]
            if self.relays:
                address = self._start_relay(index, host)
        else:
            # A misbehaving extra node: the CLI user's host, a port of its own.
            host, port = "user", free_port()
        command = supernode_command(
            address,
            index,
            self.num_nodes,
            ca_cert=(ca_cert or self.material.ca_cert) if tls else None,
            private_key=key if authenticate else None,
            port=port,
            max_retries=max_retries,
            max_wait_time=None if max_retries is None else 30,
            state_dir=self.workdir / "node-state" / f"node{index}" if regular else None,
        )
        return self._start(name, host, command, f"{name}-home")

    def _start_relay(self, index: int, host: str, timeout: float = 30) -> str:
        """Start node ``index``'s delaying relay (``deploy.relay``) in its namespace; returns
        the address the node dials instead of the SuperLink's (on the certificate's SANs)."""
        listen = f"127.0.0.1:{RELAY_PORT}"
        delay_file = self._relay_delay_file(index)
        if not delay_file.exists():
            delay_file.write_text("0\n")
        command = [sys.executable, *relay_command(listen, self.address, 0.0, delay_file)]
        process = self._start(
            f"relay-{index}", host, command, f"relay-{index}-home", cwd=PROJECT_ROOT
        )
        if not process.wait_for_log("relay ready", timeout):
            raise DeploymentError(f"relay of node {index} did not start (see {process.log_path})")
        return listen

    def start_supernodes(self, timeout: float = 90) -> list[ManagedProcess]:
        """Start every registered SuperNode and wait until each has joined the SuperLink."""
        nodes = [self.start_supernode(i) for i in range(self.num_nodes)]
        for node in nodes:
            if not node.wait_for_log(SUPERNODE_READY, timeout):
                raise DeploymentError(f"{node.name} did not join:\n{node.log()[-3000:]}")
        return nodes

    def restart_supernode(self, index: int, timeout: float = 120) -> ManagedProcess:
        """Stop SuperNode ``index`` (SIGTERM: it signs off at the SuperLink) and start it again,
        retrying while the SuperLink still holds the old one online (a SuperNode that died
        without signing off is readmitted only after its heartbeat lapsed, up to 60 s)."""
        old = next(p for p in self.processes if p.name == f"supernode-{index}")
        old.stop()
        self.processes.remove(old)
        deadline = time.monotonic() + timeout
        while True:
            node = self.start_supernode(index)
            if node.wait_for_log(SUPERNODE_READY, max(1.0, deadline - time.monotonic())):
                return node
            node.stop()
            self.processes.remove(node)
            if time.monotonic() > deadline:
                raise DeploymentError(f"supernode-{index} did not rejoin:\n{node.log()[-3000:]}")
            time.sleep(5)

    def run(self, run_config: str, timeout: float = 600) -> RunResult:
        """``flwr run . deploy --stream``, then the run's entry of ``flwr ls``."""
        command = ["run", str(PROJECT_ROOT), TLS_CONNECTION, "--stream"]
        if run_config:
            command += ["--run-config", run_config]
        try:
            result = self.cli(*command, timeout=timeout)
            log, code = result.stdout + result.stderr, result.returncode
        except subprocess.TimeoutExpired as err:
            out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            log, code = out + f"\n[flwr run timed out after {timeout} s]", 124
        superlink = next((p for p in self.processes if p.name == "superlink"), None)
        if superlink is not None and not superlink.running():
            # Seen on shared machines: a script that stops "every new flower-superlink" (by name)
            # while it runs its own simulation takes this SuperLink down too.
            log += (
                f"\n[the SuperLink (pid {superlink.pid}) ended during the run with code "
                f"{superlink.wait(0)}; -15 = SIGTERM from another process]"
            )
        match = RUN_ID_PATTERN.search(log)
        run_id = int(match.group(1)) if match else None
        info: dict[str, Any] = {}
        if run_id is not None:
            for _ in range(10):  # the status can lag the end of the stream by a moment
                runs = self.list_runs().get("runs", [])
                info = next((r for r in runs if str(r.get("run-id")) == str(run_id)), {})
                if str(info.get("status", "")).startswith("finished"):
                    break
                time.sleep(1)
        return RunResult(run_id, code, log, info)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local",
        description="Rehearse a TLS + node-authentication deployment on this machine.",
    )
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument(
        "--run-config", default="strategy='fedbif' num-server-rounds=2 device='cpu'"
    )
    parser.add_argument("--netns", action="store_true", help="one network namespace per host")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument(
        "--link-profile",
        choices=list(PROFILES),
        default=None,
        help="put each SuperNode behind its modelled link (needs --netns; core.link)",
    )
    parser.add_argument(
        "--no-rtt", action="store_true", help="shape rates only (kernels without netem)"
    )
    parser.add_argument("--seed", type=int, default=42, help="run seed (links are drawn from it)")
    args = parser.parse_args(argv)
    if args.link_profile and not args.netns:
        parser.error("--link-profile needs --netns")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="commfl-deploy-"))
    results = workdir / "results"
    run_config = (
        f"{args.run_config} min-available-clients={args.nodes} seed={args.seed} "
        f"results-dir='{results}' run-name='deploy'"
    )
    profile = None
    if args.link_profile:
        named = PROFILES[args.link_profile]
        profile = LinkProfile(
            named.up_mbps, named.down_mbps, 0.0 if args.no_rtt else named.rtt_ms, named.spread
        )
        run_config += (
            f" link-profile='custom' link-up-mbps={profile.up_mbps} "
            f"link-down-mbps={profile.down_mbps} link-rtt-ms={profile.rtt_ms} "
            f"link-spread={profile.spread}"
        )
    lab = Lab(LocalFederation.lab_hosts(args.nodes)) if args.netns else None
    if lab is not None:
        lab.create()
    try:
        with LocalFederation(workdir, args.nodes, lab=lab) as federation:
            print(f"SuperLink {federation.address}, logs in {workdir / 'logs'}", flush=True)
            if profile is not None:
                for index, link in federation.shape_links(profile, args.seed).items():
                    print(
                        f"node{index}: {link.up_mbps:.3f} up / {link.down_mbps:.3f} down Mbit/s, "
                        f"RTT {1e3 * link.rtt_s:g} ms",
                        flush=True,
                    )
            federation.start_superlink()
            federation.register_nodes()
            federation.start_supernodes()
            print(f'flwr run . {TLS_CONNECTION} --stream --run-config "{run_config}"', flush=True)
            outcome = federation.run(run_config)
            print(outcome.log[-2000:])
            print(f"run {outcome.run_id}: {outcome.status}")
            summary_path = results / "deploy" / "summary.json"
            if outcome.info and summary_path.exists():
                summary = json.loads(summary_path.read_text())
                print(TrafficComparison.of(outcome.info, summary).report())
            return 0 if outcome.status == "finished:completed" else 1
    finally:
        if lab is not None:
            lab.destroy()


if __name__ == "__main__":
    sys.exit(main())
