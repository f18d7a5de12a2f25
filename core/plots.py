"""The picture of one run: ``curves.png`` next to its ``rounds.csv``.

Three panels, read from the recorded rows only (no recomputation): accuracy and loss by round,
and accuracy by cumulative measured MB up, down and in total, the axis a reader of a
communication-efficiency toolkit cares about. matplotlib runs headless (Agg) and is imported
only when a picture is drawn, so importing this module costs nothing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PLOT_NAME = "curves.png"
MB = 1e6


def cumulative_total_mb(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    """Running sum of uplink + downlink bytes, in MB."""
    up, down = cumulative_mb(rows, "uplink_bytes"), cumulative_mb(rows, "downlink_bytes")
    return [u + d for u, d in zip(up, down, strict=True)]


def cumulative_mb(rows: Sequence[Mapping[str, Any]], column: str) -> list[float]:
    """Running sum of a byte column, in MB (10^6 bytes, as the summaries print)."""
    total, out = 0.0, []
    for row in rows:
        value = float(row.get(column, 0.0))
        total += value if math.isfinite(value) else 0.0
        out.append(total / MB)
    return out


def pyplot():  # noqa: ANN201 - matplotlib's module
    """matplotlib.pyplot on the headless Agg backend, imported only when a picture is drawn."""
    os.environ.setdefault("MPLCONFIGDIR", str(Path.home() / ".cache" / "matplotlib"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_axis(axis: Any, **labels: str) -> None:
    """A logarithmic x axis readable at every scale (cumulative MB, minutes): ticks at 1, 2 and
    5 per decade written as plain numbers (0.5, 2, 100); a point at 0 (round 0) is left out."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_xscale("log", nonpositive="mask")  # no segment from 0 MB at minus infinity
    axis.set(**labels)
    axis.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(NullFormatter())


def round_axis(axis: Any, **labels: str) -> None:
    """A round axis with whole-number ticks only."""
    from matplotlib.ticker import MaxNLocator

    axis.set(**labels)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_file_name(parts: Sequence[str], limit: int = 40) -> str:
    """A short file name (no extension) for a plot of the setting ``parts`` (``key=value``
    strings): the values only, joined by ``_``; past ``limit`` characters, cut and made unique
    by a hash of the whole setting (the picture's title carries the setting in full)."""
    import hashlib
    import re

    values = [part.split("=", 1)[-1] for part in parts]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(values)).strip("-") or "all"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:6]
    return f"{name[: limit - 7].rstrip('-_')}-{digest}"


def save_figure(figure: Any, path: Path, title: str, dpi: int = 100) -> Path:
    """Title, lay out and write ``figure`` atomically (a reader never sees half a PNG)."""
    import matplotlib.pyplot as plt

    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    figure.savefig(tmp, dpi=dpi)
    plt.close(figure)
    os.replace(tmp, path)
    return path


def plot_run(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Draw ``rows`` (``rounds.csv`` rows) into ``path``; written atomically, returns ``path``."""
    plt = pyplot()
    rounds = [float(row["round"]) for row in rows]
    accuracy = [100.0 * float(row["accuracy"]) for row in rows]
    loss = [float(row["loss"]) for row in rows]
    up = cumulative_mb(rows, "uplink_bytes")
    down = cumulative_mb(rows, "downlink_bytes")
    total = cumulative_total_mb(rows)

    figure, (by_round, by_loss, by_traffic) = plt.subplots(1, 3, figsize=(15, 4.5))
    by_round.plot(rounds, accuracy, marker=".")
    round_axis(by_round, xlabel="round", ylabel="test accuracy (%)", title="accuracy by round")
    by_loss.plot(rounds, loss, marker=".", color="tab:red")
    round_axis(by_loss, xlabel="round", ylabel="test loss", title="loss by round")
    for label, xs in (("uplink", up), ("downlink", down), ("total", total)):
        by_traffic.plot(xs, accuracy, marker=".", label=label)
    log_axis(
        by_traffic,
        xlabel="cumulative measured traffic (MB, all clients)",
        ylabel="test accuracy (%)",
        title="accuracy by traffic",
    )
    by_traffic.legend(fontsize=8)
    for axis in (by_round, by_loss, by_traffic):
        axis.grid(alpha=0.3)
    return save_figure(figure, path, title)


def plot_comparison(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, title: str
) -> Path:
    """Several runs on one picture: accuracy by round, and by cumulative total MB (up + down)."""
    plt = pyplot()

    figure, (by_round, by_traffic) = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, rows in runs.items():
        accuracy = [100.0 * float(row["accuracy"]) for row in rows]
        total = cumulative_total_mb(rows)
        (line,) = by_round.plot(
            [float(r["round"]) for r in rows], accuracy, marker=".", label=label
        )
        by_traffic.plot(total, accuracy, marker=".", label=label, color=line.get_color())
    round_axis(by_round, xlabel="round", ylabel="test accuracy (%)", title="accuracy by round")
    log_axis(
        by_traffic,
        xlabel="cumulative measured traffic, up + down (MB, all clients)",
        ylabel="test accuracy (%)",
        title="accuracy by total traffic",
    )
    for axis in (by_round, by_traffic):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return save_figure(figure, path, title)
