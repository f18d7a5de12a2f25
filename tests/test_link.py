"""The link model (core.link) on hand-computed cases, and applied by the strategies to runs."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from core.link import (
    PROFILES,
    ClientLink,
    ClientRound,
    LinkProfile,
    Transport,
    client_link,
    client_round_seconds,
    resolve_profile,
    round_time,
    seconds_to_target,
    transfer_seconds,
)
from core.results import read_rounds
from core.settings import ConfigError
from fl_app.methods import load_config
from tools.inprocess import run_inprocess

IOT_LINK = ClientLink(up_mbps=0.25, down_mbps=1.0, rtt_s=0.1)


def test_transfer_and_client_seconds_by_hand():
    assert transfer_seconds(1_000_000, 1.0) == pytest.approx(8.0)
    # 1.5 RTT (0.15 s) + 1 MB down at 1 Mbit/s (8 s) + 2 s training + 250 kB up at 0.25 (8 s)
    assert client_round_seconds(1_000_000, 250_000, 2.0, IOT_LINK) == pytest.approx(18.15)
    assert client_round_seconds(0, 0, 0.0, IOT_LINK) == pytest.approx(0.15)


def test_transport_scales_the_transfer_each_way_and_adds_its_overhead_by_hand():
    calibrated = ClientLink(0.25, 1.0, 0.1, Transport(wire_up=1.5, wire_down=2.0, overhead_s=3.0))
    # 0.15 s RTT + 2 x 8 s down + 2 s training + 1.5 x 8 s up + 3 s overhead
    assert client_round_seconds(1_000_000, 250_000, 2.0, calibrated) == pytest.approx(33.15)
    assert client_round_seconds(0, 0, 0.0, calibrated) == pytest.approx(3.15)
    flat = LinkProfile(up_mbps=2.0, down_mbps=8.0, rtt_ms=40.0, spread=0.0)
    transport = Transport(1.2, 1.1, 0.5)
    assert client_link(flat, 1, 7, transport) == ClientLink(2.0, 8.0, 0.04, transport)
    for bad in ({"wire_up": 0.0}, {"wire_down": math.nan}, {"overhead_s": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Transport(**bad)
    with pytest.raises(ConfigError, match="link-wire-up"):
        load_config({"link-profile": "iot", "link-wire-up": 0.0})
    with pytest.raises(ConfigError, match="link-overhead-s"):
        load_config({"link-profile": "iot", "link-overhead-s": -2.0})


def test_round_ends_with_the_last_client_or_at_the_deadline_dropping_the_straggler():
    def client(name: str, compute: float) -> ClientRound:
        return ClientRound(name, 125_000, 31_250, compute, IOT_LINK)  # 1 s down, 1 s up

    clients = [client("a", 3.0), client("b", 5.0), client("c", 28.0)]
    assert [c.seconds for c in clients] == pytest.approx([5.15, 7.15, 30.15])
    unlimited = round_time(clients)
    assert unlimited.seconds == pytest.approx(30.15) and unlimited.late == ()
    deadline = round_time(clients, deadline=10.0)
    assert deadline.seconds == 10.0 and deadline.late == ("c",)
    on_time = round_time(clients[:2], deadline=10.0)
    assert on_time.seconds == pytest.approx(7.15) and on_time.late == ()
    assert round_time([], deadline=10.0).seconds == 0.0


def test_client_links_are_seeded_log_normal_around_the_profile():
    flat = LinkProfile(up_mbps=2.0, down_mbps=8.0, rtt_ms=40.0, spread=0.0)
    assert client_link(flat, seed=1, partition=7) == ClientLink(2.0, 8.0, 0.04)
    spread = LinkProfile(up_mbps=2.0, down_mbps=8.0, rtt_ms=40.0, spread=0.5)
    links = [client_link(spread, seed=3, partition=p) for p in range(4000)]
    assert links[5] == client_link(spread, seed=3, partition=5)  # same client, same link
    assert client_link(spread, seed=4, partition=5) != links[5]
    factors = np.log([link.up_mbps / 2.0 for link in links])
    # log factors ~ N(0, 0.5^2): mean within 4 standard errors, spread within 5%
    assert abs(factors.mean()) < 4 * 0.5 / math.sqrt(len(links))
    assert factors.std() == pytest.approx(0.5, rel=0.05)
    # one factor for both directions: a slow client is slow both ways
    assert all(link.down_mbps / link.up_mbps == pytest.approx(4.0) for link in links)


def test_profiles_resolve_and_bad_values_fail_fast():
    assert resolve_profile("none", 1, 1, 1, 0) is None
    assert resolve_profile("cellular", 1, 1, 1, 0) == PROFILES["cellular"]
    assert resolve_profile("custom", 3.0, 30.0, 10.0, 0.2) == LinkProfile(3.0, 30.0, 10.0, 0.2)
    with pytest.raises(ValueError, match="iot, cellular, broadband, custom"):
        resolve_profile("satellite", 1, 1, 1, 0)
    with pytest.raises(ValueError, match="up_mbps"):
        LinkProfile(up_mbps=0.0, down_mbps=1.0, rtt_ms=0.0)
    with pytest.raises(ConfigError, match="broadband"):
        load_config({"link-profile": "satellite"})
    with pytest.raises(ConfigError, match="link-up-mbps"):
        load_config({"link-profile": "custom", "link-up-mbps": 0.0})


def test_seconds_to_target():
    accuracies, seconds = [0.1, 0.6, 0.95, 0.97], [0.0, 10.0, 20.0, 30.0]
    assert seconds_to_target(accuracies, seconds, 0.95) == 20.0
    assert seconds_to_target(accuracies, seconds, 0.99) is None
    assert seconds_to_target(accuracies, seconds, 0.0) is None


def read_clients(path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_run_records_modelled_seconds_per_round_and_per_client(tmp_path):
    """rounds.csv's link_seconds is the slowest client's modelled time, recomputed here from
    clients.csv's bytes and training seconds; the summary's time to target follows."""
    config = {
        "strategy": "fedbif",
        "device": "cpu",
        "num-server-rounds": 2,
        "local-epochs": 1,
        "link-profile": "iot",
        "link-wire-up": 1.5,
        "link-wire-down": 1.25,
        "link-overhead-s": 0.75,
        "target-accuracy": 0.3,
        "results-dir": str(tmp_path),
        "run-name": "iot",
    }
    run_inprocess(config, num_clients=4)
    run = tmp_path / "iot"
    rounds = read_rounds(run / "rounds.csv")
    clients = read_clients(run / "clients.csv")
    assert len(clients) == 8 and {c["status"] for c in clients} == {"accepted"}
    for row in rounds[1:]:
        mine = [c for c in clients if int(c["round"]) == row["round"]]
        assert sum(int(c["uplink_bytes"]) for c in mine) == row["uplink_bytes"]
        assert sum(int(c["downlink_bytes"]) for c in mine) == row["downlink_bytes"]
        expected = [
            client_round_seconds(
                int(c["downlink_bytes"]),
                int(c["uplink_bytes"]),
                float(c["train_seconds"]),
                client_link(PROFILES["iot"], 42, int(c["partition"]), Transport(1.5, 1.25, 0.75)),
            )
            for c in mine
        ]
        assert [float(c["link_seconds"]) for c in mine] == pytest.approx(expected)
        assert row["link_seconds"] == pytest.approx(max(expected))
    assert rounds[2]["link_seconds_total"] == pytest.approx(
        rounds[1]["link_seconds"] + rounds[2]["link_seconds"]
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["link_profile"] == "iot"
    assert summary["link_seconds_total"] == pytest.approx(rounds[2]["link_seconds_total"])
    reached = next(r for r in rounds if r["accuracy"] >= 0.3)
    assert summary["round_to_target"] == reached["round"]
    assert summary["link_seconds_to_target"] == pytest.approx(reached["link_seconds_total"])
    assert summary["total_bytes_to_target"] == sum(
        r["total_bytes"] for r in rounds if r["round"] <= reached["round"]
    )


def test_a_modelled_deadline_drops_the_slowest_client(tmp_path):
    """With round-timeout just below the slowest client's modelled time, that client is late:
    dropped before decoding, counted in `late`, and the round lasts the deadline."""
    base = {
        "strategy": "fedavg",
        "device": "cpu",
        "num-server-rounds": 1,
        "local-epochs": 1,
        "link-profile": "custom",
        "link-up-mbps": 0.5,
        "link-down-mbps": 2.0,
        "link-spread": 1.0,
        "checkpoint": False,
    }
    run_inprocess({**base, "results-dir": str(tmp_path / "free")}, num_clients=4)
    (free,) = [p for p in (tmp_path / "free").iterdir()]
    times = {c["cid"]: float(c["link_seconds"]) for c in read_clients(free / "clients.csv")}
    slowest = max(times, key=times.get)
    others = max(t for c, t in times.items() if c != slowest)
    # training seconds vary between runs; the gap of the log-normal links (spread 1) is wide
    deadline = (others + times[slowest]) / 2
    assert times[slowest] - others > 1.0
    strategy = run_inprocess(
        {**base, "round-timeout": deadline, "results-dir": str(tmp_path / "cut")}, num_clients=4
    )
    (cut,) = [p for p in (tmp_path / "cut").iterdir()]
    row = read_rounds(cut / "rounds.csv")[1]
    assert row["late"] == 1 and row["clients"] == 3 and row["rejected"] == 0
    assert row["link_seconds"] == pytest.approx(deadline)
    status = {c["cid"]: c["status"] for c in read_clients(cut / "clients.csv")}
    assert status.pop(slowest) == "late" and set(status.values()) == {"accepted"}
    assert strategy.history[-1]["clients"] == 3


def test_without_a_profile_nothing_is_modelled(tmp_path):
    run_inprocess(
        {
            "strategy": "fedavg",
            "device": "cpu",
            "num-server-rounds": 1,
            "local-epochs": 1,
            "results-dir": str(tmp_path),
            "run-name": "plain",
            "round-timeout": 0.001,
        },
        num_clients=2,
    )
    row = read_rounds(tmp_path / "plain" / "rounds.csv")[1]
    assert math.isnan(row["link_seconds"]) and math.isnan(row["link_seconds_total"])
    assert row["late"] == 0 and row["clients"] == 2  # round-timeout is Flower's, not modelled
    summary = json.loads((tmp_path / "plain" / "summary.json").read_text())
    assert summary["link_seconds_total"] is None and summary["link_seconds_to_target"] is None
    clients = read_clients(tmp_path / "plain" / "clients.csv")
    assert len(clients) == 2 and all(c["link_seconds"] == "nan" for c in clients)


def test_link_validation_calibrates_the_transport_from_the_unshaped_run():
    """The networked check's calibration: wire factors from the unshaped run's steady bytes
    (never below 1), overhead = its round seconds beyond the slowest client's training; and the
    calibrated model recomputed from recorded clients equals the hand-computed round."""
    from benchmarks.link_validation import Case, calibration, modelled_round_seconds
    from tools.link_report import ClientRecord

    unshaped = Case("none", "fedavg", 0, 13.0, math.nan, 0.5, "ok", wire_down=1.2, wire_up=1.45)
    assert calibration(unshaped) == Transport(wire_up=1.45, wire_down=1.2, overhead_s=12.5)
    odd = Case("none", "x", 0, 0.2, math.nan, 0.5, "ok", wire_down=0.9, wire_up=math.nan)
    assert calibration(odd) == Transport(1.0, 1.0, 0.0)
    flat = LinkProfile(up_mbps=0.25, down_mbps=1.0, rtt_ms=100.0, spread=0.0)
    records = {
        2: [ClientRecord(2, "a", 0, 125_000, 31_250, 1.0), ClientRecord(2, "b", 1, 0, 0, 4.0)],
        3: [ClientRecord(3, "a", 0, 250_000, 31_250, 1.0)],
    }
    transport = Transport(wire_up=2.0, wire_down=1.0, overhead_s=10.0)
    # round 2: a = 0.15 + 1 + 1 + 2 x 1 + 10 = 14.15, b = 0.15 + 4 + 10; round 3: 15.15
    seconds = modelled_round_seconds(records, [2, 3], flat, 0, transport)
    assert seconds == pytest.approx((14.15 + 15.15) / 2)
