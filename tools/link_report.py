"""Time to a target accuracy on modelled links, from recorded runs (``clients.csv``).

A run records, per client and round, the bytes the server sent and received and the client's
training seconds (``strategies.link_timing``). The link model (``core.link``) turns them into
round times on any profile, so one run answers for every profile without being run again
(with no deadline: a deadline changes who is aggregated, so it needs a run of its own). The
experiment harness (``tools.experiment``) adds this table and plot to a report when its file
names ``link-profiles``.

``link-scale-params = [0, N]`` adds the same table with every message scaled to a model of N
parameters (bytes x N / the run's parameter count, training seconds unchanged): the same
method's traffic on a larger model's messages, e.g. ``cnn4``'s 392,426.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.link import PROFILES, ClientRound, client_link, round_time, seconds_to_target
from core.plots import log_axis, pyplot, save_figure


@dataclass(frozen=True)
class ClientRecord:
    """One ``clients.csv`` row."""

    round: int
    cid: str
    partition: int
    downlink_bytes: int
    uplink_bytes: int
    train_seconds: float


def read_client_records(run_dir: Path) -> dict[int, list[ClientRecord]]:
    """A run's ``clients.csv`` by round (empty when the run has none: recorded before it
    existed)."""
    path = run_dir / "clients.csv"
    by_round: dict[int, list[ClientRecord]] = defaultdict(list)
    if not path.exists():
        return by_round
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            record = ClientRecord(
                int(row["round"]),
                row["cid"],
                int(row["partition"]),
                int(row["downlink_bytes"]),
                int(row["uplink_bytes"]),
                float(row["train_seconds"]),
            )
            by_round[record.round].append(record)
    return by_round


def modelled_seconds(
    records: dict[int, list[ClientRecord]],
    rounds: Iterable[int],
    profile: str,
    seed: int,
    scale: float = 1.0,
) -> np.ndarray:
    """Cumulative modelled seconds after each of ``rounds`` (round 0: 0 s) on ``profile``."""
    link_profile = PROFILES[profile]
    total, out = 0.0, []
    for r in rounds:
        clients = [
            ClientRound(
                c.cid,
                round(c.downlink_bytes * scale),
                round(c.uplink_bytes * scale),
                c.train_seconds,
                client_link(link_profile, seed, max(c.partition, 0)),
            )
            for c in records.get(r, [])
        ]
        total += round_time(clients).seconds if r > 0 else 0.0
        out.append(total)
    return np.array(out)


def seconds_to_reach(accuracy: Iterable[float], seconds: np.ndarray, target: float) -> float:
    """Cumulative seconds at the first round after round 0 at or above ``target`` (the
    initial model does not count); NaN if none (``core.link.seconds_to_target``)."""
    reached = seconds_to_target(list(accuracy)[1:], list(seconds[1:]), target)
    return math.nan if reached is None else float(reached)


@dataclass
class LinkRun:
    """One run with its modelled time curve per profile."""

    method: str
    group: tuple[str, ...]
    accuracy: np.ndarray  # per recorded round, 0..1
    seconds: dict[str, np.ndarray]


def link_runs(
    runs: Iterable[tuple[str, tuple[str, ...], Path, list[dict[str, float]], dict]],
    profiles: Iterable[str],
    scale_params: int = 0,
) -> list[LinkRun]:
    """(method, group, run folder, rounds.csv rows, summary) -> ``LinkRun``s, for the runs
    that recorded ``clients.csv``."""
    out = []
    for method, group, run_dir, rounds, summary in runs:
        records = read_client_records(run_dir)
        if not records:
            continue
        scale = scale_params / summary["num_params"] if scale_params else 1.0
        numbers = [int(row["round"]) for row in rounds]
        seed = int(summary["config"]["seed"])
        out.append(
            LinkRun(
                method,
                group,
                np.array([row["accuracy"] for row in rounds]),
                {p: modelled_seconds(records, numbers, p, seed, scale) for p in profiles},
            )
        )
    return out


def time_rows(runs: list[LinkRun], profiles: list[str], target: float) -> dict[tuple, list[dict]]:
    """Per group, one row per method: mean modelled seconds to ``target`` per profile over
    the seeds that reached it, and how many did."""
    grouped: dict[tuple, dict[str, list[LinkRun]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        grouped[run.group][run.method].append(run)
    tables = {}
    for group, methods in grouped.items():
        rows = []
        for method, method_runs in sorted(methods.items()):
            row: dict = {"method": method, "seeds": len(method_runs)}
            for profile in profiles:
                times = [
                    seconds_to_reach(r.accuracy, r.seconds[profile], target) for r in method_runs
                ]
                reached = [t for t in times if not math.isnan(t)]
                row[profile] = float(np.mean(reached)) if reached else math.nan
                row[f"{profile}_reached"] = len(reached)
            rows.append(row)
        tables[group] = rows
    return tables


def _seconds_text(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def time_table(rows: list[dict], profiles: list[str], target: float) -> str:
    """Markdown: a column per profile, the fastest method of each in bold; a method that
    reached the target in only some seeds is ranked by those, and says how many."""
    percent = f"{100 * target:.0f}%"
    header = ["method", *(f"{p} to {percent}" for p in profiles)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    fastest = {}
    for profile in profiles:
        done = [
            r for r in rows if not math.isnan(r[profile]) and r[f"{profile}_reached"] == r["seeds"]
        ]
        fastest[profile] = min(done, key=lambda r: r[profile])["method"] if done else None
    for row in rows:
        cells = [row["method"]]
        for profile in profiles:
            if math.isnan(row[profile]):
                cells.append("not reached")
                continue
            text = _seconds_text(row[profile])
            if row[f"{profile}_reached"] < row["seeds"]:
                text += f" ({row[f'{profile}_reached']}/{row['seeds']})"
            cells.append(f"**{text}**" if fastest[profile] == row["method"] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_time(runs: list[LinkRun], profiles: list[str], title: str, path: Path) -> None:
    """Accuracy against modelled time, one panel per profile, mean over seeds per method."""
    plt = pyplot()
    figure, axes = plt.subplots(1, len(profiles), figsize=(5.5 * len(profiles), 4.2))
    axes = np.atleast_1d(axes)
    by_method: dict[str, list[LinkRun]] = defaultdict(list)
    for run in runs:
        by_method[run.method].append(run)
    for axis, profile in zip(axes, profiles, strict=True):
        for method, method_runs in sorted(by_method.items()):
            length = min(len(r.accuracy) for r in method_runs)
            accuracy = np.mean([r.accuracy[:length] for r in method_runs], axis=0) * 100
            seconds = np.mean([r.seconds[profile][:length] for r in method_runs], axis=0)
            axis.plot(seconds / 60, accuracy, label=method)
        log_axis(
            axis,
            xlabel="modelled time (min)",
            ylabel="test accuracy (%)",
            title=f"{profile} ({PROFILES[profile].up_mbps:g}/{PROFILES[profile].down_mbps:g} "
            f"Mbit/s up/down)",
        )
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save_figure(figure, path, title, dpi=110)
