"""Real deployment: SuperLink + SuperNodes with TLS and node authentication (``deploy/``).

The fast tests check the key material and command lines. The ``deploy`` tests start real
processes: on loopback, a SuperLink and 3 SuperNodes run 2 rounds of FedBiF, whose result must be
bit-identical to the in-process reference (so per-client ``context.state`` survived between
rounds in the SuperNodes), and whose traffic as Flower reports it must agree with the app's own
byte count; clients without TLS, with a foreign CA or with an unregistered key are refused. Where
network namespaces can be made, a second federation runs across separate namespaced hosts.
Every process is stopped by PID with its whole tree, namespaces are deleted, even on failure.
"""

from __future__ import annotations

import json
import socket
import ssl
import stat
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.common import Context, FitIns, FitRes
from flwr.common.config import parse_config_args

from clients.attacks import attacking_partitions
from core.link import LinkProfile
from core.results import read_rounds
from deploy import certs
from deploy.cliconfig import write_connection
from deploy.local import (
    ENVELOPE_PER_ARRAY,
    ENVELOPE_PER_MESSAGE,
    INSECURE_CONNECTION,
    TLS_CONNECTION,
    LocalFederation,
    TrafficComparison,
)
from deploy.netns import Lab, shaping_unavailable_reason, unavailable_reason
from deploy.nodes import node_config, supernode_command
from deploy.procs import alive
from deploy.superlink import superlink_command
from fl_app.client_app import client_fn
from tools.inprocess import run_inprocess
from tools.link_report import read_client_records

NUM_NODES = 3
FEDBIF = {
    "strategy": "fedbif",
    "num-server-rounds": 2,
    "min-available-clients": NUM_NODES,
    "device": "cpu",
    "seed": 42,
}


def toml_run_config(values: dict[str, object]) -> str:
    """``--run-config`` text (TOML values: strings quoted)."""
    return " ".join(
        f"{key}='{value}'" if isinstance(value, str) else f"{key}={str(value).lower()}"
        if isinstance(value, bool) else f"{key}={value}"
        for key, value in values.items()
    )  # fmt: skip


# ------------------------------------------------------------------------------ key material
BACKENDS = ["python", pytest.param("cli", marks=pytest.mark.skipif(
    not certs.cli_tools_available(), reason="openssl or ssh-keygen not installed"))]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_certificates_name_every_host_and_chain_to_the_ca(tmp_path, backend):
    material = certs.make_all(
        tmp_path / "certs",
        hosts=["SuperLink.Example.org", "10.1.2.3", "fd00::5"],
        node_names=certs.node_key_names(2),
        backend=backend,
    )
    names = certs.certificate_subject_names(material.server_cert)
    assert names == [
        "localhost", "127.0.0.1", "::1", "superlink.example.org", "10.1.2.3", "fd00::5"
    ]  # fmt: skip
    ca = x509.load_pem_x509_certificate(material.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(material.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (material.ca_key, material.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert [node.name for node in material.nodes] == ["supernode-0", "supernode-1"]
    for node in material.nodes:
        private = load_ssh_private_key(node.private_key.read_bytes(), None)
        public = load_ssh_public_key(node.public_key.read_bytes())
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
        assert private.public_key() == public  # the pair matches
        assert stat.S_IMODE(node.private_key.stat().st_mode) == 0o600


def test_rerunning_keeps_ca_and_node_keys_but_reissues_the_server_certificate(tmp_path):
    first = certs.make_all(tmp_path, hosts=["a.example"], node_names=["n0"], backend="python")
    ca, node_key = first.ca_cert.read_bytes(), first.nodes[0].private_key.read_bytes()
    second = certs.make_all(tmp_path, hosts=["b.example"], node_names=["n0"], backend="python")
    assert second.ca_cert.read_bytes() == ca
    assert second.nodes[0].private_key.read_bytes() == node_key
    assert "b.example" in certs.certificate_subject_names(second.server_cert)
    assert "a.example" not in certs.certificate_subject_names(second.server_cert)
    forced = certs.make_all(tmp_path, node_names=["n0"], backend="python", force=True)
    assert forced.ca_cert.read_bytes() != ca
    assert forced.nodes[0].private_key.read_bytes() != node_key


def test_command_lines_enable_tls_auth_and_offline_mode(tmp_path):
    material = certs.make_all(tmp_path, backend="python")
    command = superlink_command(tmp_path, host="0.0.0.0", port=8123, database=tmp_path / "s.db")
    assert command[0] == "flower-superlink"
    assert "--insecure" not in command
    for flag, value in (
        ("--ssl-ca-certfile", material.ca_cert),
        ("--ssl-certfile", material.server_cert),
        ("--ssl-keyfile", material.server_key),
        ("--host", "0.0.0.0"),
        ("--port", "8123"),
    ):
        assert command[command.index(flag) + 1] == str(value)
    assert {"--enable-supernode-auth", "--disable-runtime-dependency-installation"} <= set(command)
    with pytest.raises(FileNotFoundError, match="deploy.certs"):
        superlink_command(tmp_path / "missing")

    node = supernode_command(
        "10.0.0.5:8123", 2, 3, ca_cert=material.ca_cert, private_key=tmp_path / "k", port=9200
    )
    assert node[node.index("--node-config") + 1] == "partition-id=2 num-partitions=3"
    assert node[node.index("--root-certificates") + 1] == str(material.ca_cert)
    assert "--insecure" not in node and node[node.index("--port") + 1] == "9200"
    insecure = supernode_command("h:1", 0, 1, ca_cert=None, private_key=None)
    assert "--insecure" in insecure and "--auth-supernode-private-key" not in insecure
    with pytest.raises(ValueError, match="partition-id"):
        node_config(3, 3)
    kept = supernode_command("h:1", 0, 1, ca_cert=None, private_key=None, state_dir=tmp_path)
    parsed = parse_config_args([kept[kept.index("--node-config") + 1]])
    assert parsed == {"partition-id": 0, "num-partitions": 1, "state-dir": str(tmp_path)}


def test_cli_connection_is_added_without_losing_other_entries(tmp_path):
    (tmp_path / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )
    write_connection(tmp_path, "prod", "10.0.0.5:8000", root_certificates=tmp_path / "ca.crt")
    config = tomllib.loads((tmp_path / "config.toml").read_text())
    assert config["superlink"]["local"] == {"address": ":local:"}
    assert config["superlink"]["default"] == "local"  # not taken over unless asked
    assert config["superlink"]["prod"] == {
        "address": "10.0.0.5:8000",
        "root-certificates": str((tmp_path / "ca.crt").resolve()),
    }
    write_connection(tmp_path, "prod", "h:1", insecure=True, make_default=True)
    config = tomllib.loads((tmp_path / "config.toml").read_text())
    assert config["superlink"]["prod"] == {"address": "h:1", "insecure": True}
    assert config["superlink"]["default"] == "prod"
    with pytest.raises(ValueError):
        write_connection(tmp_path, "x", "h:1")  # neither TLS nor explicitly insecure


def test_traffic_comparison_bounds():
    summary = {"uplink_bytes": 1000, "downlink_bytes": 5000, "uplink_messages": 2,
               "downlink_messages": 2}  # fmt: skip
    run = {"network-traffic": {"inbound-bytes": 1000 + 2 * 2500, "outbound-bytes": 5000 + 6000}}
    assert TrafficComparison.of(run, summary).problems(2, 3) == []
    run["network-traffic"]["inbound-bytes"] = 999  # Flower saw less than the payload: wrong
    assert "uplink" in TrafficComparison.of(run, summary).problems(2, 3)[0]
    largest = 1000 + 2 * (ENVELOPE_PER_MESSAGE + 2 * ENVELOPE_PER_ARRAY)
    run["network-traffic"]["inbound-bytes"] = largest
    assert TrafficComparison.of(run, summary).problems(2, 3) == []
    run["network-traffic"]["inbound-bytes"] = largest + 1
    assert TrafficComparison.of(run, summary).problems(2, 3)
    assert TrafficComparison.of(run, summary).problems(3, 3) == []  # one more array per message


# ------------------------------------------------------------------------------ deployment
def node_log_lines(process_log: str) -> str:
    return "\n".join(process_log.splitlines()[-15:])


@pytest.fixture(scope="module")
def loopback(tmp_path_factory) -> Iterator[LocalFederation]:
    """SuperLink + 3 registered SuperNodes on loopback, free ports, TLS and node auth."""
    workdir = tmp_path_factory.mktemp("deploy-loopback")
    with LocalFederation(workdir, NUM_NODES) as federation:  # stops every process on exit
        federation.start_superlink()
        federation.register_nodes()
        federation.start_supernodes()
        yield federation
        pids = federation.pids()
    assert pids and not [pid for pid in pids if alive(pid)], "processes outlived the federation"


@pytest.mark.deploy
def test_unregistered_supernode_is_refused(loopback):
    node = loopback.start_supernode(0, key_name="unregistered", max_retries=1, name="unregistered")
    code = node.wait(timeout=90)
    assert code is not None and code != 0, node.log()[-2000:]
    assert "Failed to activate SuperNode" in node.log(), node_log_lines(node.log())


@pytest.mark.deploy
def test_clients_without_tls_a_foreign_ca_or_a_wrong_name_are_refused(loopback, tmp_path):
    assert loopback.list_runs(TLS_CONNECTION)["success"] is True
    refused = loopback.list_runs(INSECURE_CONNECTION)
    assert refused["success"] is False
    assert "unavailable" in refused["error-message"].lower()

    plain = loopback.start_supernode(1, tls=False, authenticate=False, max_retries=1,
                                     name="plain")  # fmt: skip
    foreign_ca = certs.make_ca(tmp_path / "foreign", backend="python")[0]
    foreign = loopback.start_supernode(2, ca_cert=foreign_ca, max_retries=1, name="foreign")
    for node in (plain, foreign):
        code = node.wait(timeout=90)
        assert code is not None and code != 0, node.log()[-2000:]
        assert "Failed to initialize the connection" in node.log(), node_log_lines(node.log())
    superlink_log = loopback.processes[0].log()
    assert "Activated node_id" in superlink_log  # the three real nodes did get in

    # What every client checks: the CA signed the certificate, and it names the dialled host.
    context = ssl.create_default_context(cafile=str(loopback.material.ca_cert))
    host, port = loopback.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            context.wrap_socket(raw, server_hostname="not-in-the-certificate.example")


@pytest.mark.deploy
def test_fedbif_runs_across_supernodes_with_client_state_and_agreeing_traffic(
    loopback, tmp_path, record_property
):
    config = {**FEDBIF, "results-dir": str(tmp_path / "deployed"), "run-name": "fedbif"}
    outcome = loopback.run(toml_run_config(config), timeout=420)
    assert outcome.status == "finished:completed", outcome.log[-4000:]
    run_dir = tmp_path / "deployed" / "fedbif"
    rows = read_rounds(run_dir / "rounds.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert all(row["clients"] == NUM_NODES and row["failures"] == 0 for row in rows[1:])
    assert summary["strategy"] == "fedbif" and summary["completed"]

    # Same seed in one process, where each client's Context is kept by hand: every number must
    # match. FedBiF's round 2 starts from the magnitudes kept in context.state (VBI); had a
    # SuperNode lost them, round 2 would equal the VBI-off run, which differs.
    arrays: dict[str, set[int]] = {"up": set(), "down": set()}

    def counting_client_fn(context: Context) -> Any:
        """The app's client, noting how many arrays each message carries."""
        client = client_fn(context)

        class Counting:
            def fit(self, ins: FitIns) -> FitRes:
                res = client.fit(ins)
                arrays["down"].add(len(ins.parameters.tensors))
                arrays["up"].add(len(res.parameters.tensors))
                return res

        return Counting()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the SuperNodes' ClientApps run with OMP_NUM_THREADS=1
    try:
        reference = run_inprocess(
            {**config, "results-dir": str(tmp_path / "inprocess")},
            num_clients=NUM_NODES,
            client_fn=counting_client_fn,
        ).history
        no_state = run_inprocess(
            {**config, "results-dir": str(tmp_path / "no-vbi"), "fedbif-vbi": False},
            num_clients=NUM_NODES,
        ).history
    finally:
        torch.set_num_threads(threads)
    for key in ("train_loss", "loss", "accuracy", "uplink_bytes", "downlink_bytes"):
        assert rows[2][key] == pytest.approx(reference[2][key], rel=1e-9, nan_ok=True), key
    assert rows[2]["train_loss"] != pytest.approx(no_state[2]["train_loss"], rel=1e-6)

    comparison = TrafficComparison.of(outcome.info, summary)
    report = comparison.report()
    print(f"\ntraffic cross-check: {report}")
    record_property("traffic", report)
    (run_dir / "traffic-crosscheck.json").write_text(json.dumps(asdict(comparison), indent=2))
    assert comparison.problems(max(arrays["up"]), max(arrays["down"])) == []


def reference_history(config: dict[str, Any], results_dir) -> list[dict[str, float]]:  # noqa: ANN001
    """The same run in one process, one thread per client as the SuperNodes' ClientApps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_inprocess(
            {**config, "results-dir": str(results_dir)}, num_clients=NUM_NODES
        ).history
    finally:
        torch.set_num_threads(threads)


@pytest.mark.deploy
def test_a_supernode_restarted_mid_run_resumes_with_its_client_state(loopback, tmp_path):
    """Stop SuperNode 0 right after it answered round 1 and start it again while another client
    still trains (a ``stall`` attacker holds the round open): it reads its FedBiF virtual-bit
    magnitudes back from its state-dir, and round 2 equals an uninterrupted run's."""
    seed = next(s for s in range(100) if attacking_partitions(s, NUM_NODES, 0.34) == {2})
    config = {**FEDBIF, "seed": seed, "attack": "stall", "attack-fraction": 0.34}
    config |= {"attack-stall-seconds": 30.0, "results-dir": str(tmp_path / "deployed")}
    config["run-name"] = "restart"
    node = next(p for p in loopback.processes if p.name == "supernode-0")
    replies_before = node.log().count("Sent successfully")
    outcome: dict[str, Any] = {}
    runner = threading.Thread(
        target=lambda: outcome.update(run=loopback.run(toml_run_config(config), timeout=600))
    )
    runner.start()
    deadline = time.monotonic() + 300
    while node.log().count("Sent successfully") == replies_before:  # round 1's reply delivered
        assert time.monotonic() < deadline and runner.is_alive(), node_log_lines(node.log())
        time.sleep(0.1)
    # The ServerApp pulls replies every few seconds, and the SuperLink answers a pull for a node
    # that went offline with "Node Unavailable" even when its reply is stored: give the pull
    # time (node 2 stalls for another ~25 s).
    time.sleep(6.0)
    restarted = loopback.restart_supernode(0, timeout=25)
    runner.join(timeout=650)
    run = outcome["run"]
    assert run.status == "finished:completed", run.log[-4000:]
    rows = read_rounds(tmp_path / "deployed" / "restart" / "rounds.csv")
    assert all(row["clients"] == NUM_NODES and row["failures"] == 0 for row in rows[1:]), run.log[
        -6000:
    ]
    assert "node state restored" in restarted.log(), node_log_lines(restarted.log())
    # The stall changes no payload: the reference runs without it (and without the wait).
    reference = reference_history({**config, "attack": "none"}, tmp_path / "inprocess")
    for key in ("train_loss", "loss", "accuracy"):
        assert rows[2][key] == pytest.approx(reference[2][key], rel=1e-9), key


#: a slow link for the shaping check: FedAvg's ~0.2 MB digits messages take ~4 s down and
#: ~16 s up on it, far above the deployment's own per-round noise (its 3 s reply collection).
SLOW_LINK = LinkProfile(up_mbps=0.1, down_mbps=0.4, rtt_ms=0.0, spread=0.0)


@pytest.mark.deploy
def test_separate_hosts_over_network_namespaces(tmp_path):
    """Separate hosts, then the same deployment with every SuperNode behind a shaped link: the
    round takes longer by the transfer time the link model predicts (and models exactly that
    from the run's own bytes), and nothing of the lab is left afterwards."""
    if reason := unavailable_reason():
        pytest.skip(f"separate-host test needs network namespaces: {reason}")
    shaping = shaping_unavailable_reason()
    num_nodes = 2
    lab = Lab(LocalFederation.lab_hosts(num_nodes))
    runs = {}
    with lab:  # namespaces are deleted on exit, after the federation's processes are stopped
        with LocalFederation(tmp_path / "work", num_nodes, lab=lab) as federation:
            superlink = federation.start_superlink()
            federation.register_nodes()
            federation.start_supernodes()
            config = {
                **FEDBIF,
                "strategy": "fedavg",
                "num-server-rounds": 2,
                "local-epochs": 1,
                "min-available-clients": num_nodes,
                "results-dir": str(tmp_path / "results"),
                "run-name": "netns",
            }
            outcome = federation.run(toml_run_config(config), timeout=300)
            received, sent = lab.interface_counters("superlink")
            runs["netns"] = outcome
            if shaping is None:
                federation.shape_links(SLOW_LINK, seed=42)
                qdiscs = lab.qdiscs("node0")
                shaped = {
                    **config,
                    "run-name": "shaped",
                    "link-profile": "custom",
                    "link-up-mbps": SLOW_LINK.up_mbps,
                    "link-down-mbps": SLOW_LINK.down_mbps,
                    "link-rtt-ms": 0.0,
                    "link-spread": 0.0,
                }
                runs["shaped"] = federation.run(toml_run_config(shaped), timeout=300)
            pids = federation.pids()
        for name, run in runs.items():
            assert run.status == "finished:completed", f"{name}: {run.log[-4000:]}"
        # The SuperLink listened on its own interface and the nodes came from their hosts.
        assert federation.address == f"{lab['superlink'].address}:8000"
        for index in range(num_nodes):
            assert f"{lab[f'node{index}'].address}:" in superlink.log()
        # Everything Flower counted crossed the SuperLink's eth0, plus HTTP/TLS framing.
        traffic = outcome.info["network-traffic"]
        assert received >= traffic["inbound-bytes"] > 0 and sent >= traffic["outbound-bytes"] > 0
        assert not [pid for pid in pids if alive(pid)]
        if shaping is None:
            up, down = qdiscs  # the node's eth0 (uplink) and its switch port (downlink)
            assert "tbf" in up and "100Kbit" in up and "tbf" in down and "400Kbit" in down
            # round 2: round 1 also carries the app bundle (FAB) and starts the ClientApps
            plain = read_rounds(tmp_path / "results" / "netns" / "rounds.csv")[2]
            slow = read_rounds(tmp_path / "results" / "shaped" / "rounds.csv")[2]
            clients = read_client_records(tmp_path / "results" / "shaped")[2]
            slowest = max(
                8 * c.downlink_bytes / 0.4e6 + 8 * c.uplink_bytes / 0.1e6 for c in clients
            )
            compute = max(c.train_seconds for c in clients)
            assert slow["link_seconds"] == pytest.approx(slowest + compute, rel=0.02)
            extra = slow["seconds"] - plain["seconds"]
            # transfer measured on 2 cores beside Flower's 3 s reply collection: within 0.7x
            # to 1.6x of the model plus one collection interval
            assert 0.7 * slowest - 3 < extra < 1.6 * slowest + 3, (extra, slowest)
    assert not lab.exists()
