"""The robustness table of ``experiments/attacks.toml``: per method and attack, run status,
final accuracy against the clean run, and what the defenses did (rejected, failures, clipped).

    python -m benchmarks.attack_table experiments/attacks.toml [--out table.md]

Reads each point's ``summary.json``; a point without one is listed as ``missing``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tools.experiment import load_experiment

#: the goal of the issue: no attack but sign-flip/scaled-update at 3 of 10 costs more than this.
GOAL_POINTS = 3.0
EXEMPT = {("sign-flip", 0.3), ("scaled-update", 0.3)}


def table(experiment_file: Path) -> str:
    """The Markdown table, one row per method and attack setting."""
    experiment = load_experiment(experiment_file)
    summaries: dict[tuple[str, str, float], dict] = {}
    for point in experiment.points():
        path = experiment.folder / point.name / "summary.json"
        key = (
            str(point.config["strategy"]),
            str(point.config.get("attack", "none")),
            float(point.config.get("attack-fraction", 0.0)),
        )
        summaries[key] = json.loads(path.read_text()) if path.exists() else {}
    lines = [
        "| method | attack | attackers | status | final acc % | vs clean (pts) | rejected | "
        "failures | clipped | goal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (strategy, attack, fraction), summary in summaries.items():
        clean = summaries.get((strategy, "none", 0.0), {}).get("final_accuracy")
        accuracy = summary.get("final_accuracy")
        status = "completed" if summary.get("completed") else "missing" if not summary else "failed"
        if accuracy is None or clean is None:
            delta, goal = "", ""
        else:
            points = 100 * (accuracy - clean)
            delta = f"{points:+.2f}"
            exempt = (attack, fraction) in EXEMPT or attack == "none"
            goal = "exempt" if exempt else ("met" if points >= -GOAL_POINTS else "MISSED")
        attackers = "0" if attack == "none" else f"{round(fraction * 10)} of 10"
        acc = f"{100 * accuracy:.2f}" if accuracy is not None else "n/a"
        lines.append(
            f"| {strategy} | {attack} | {attackers} | {status} | {acc} | {delta} | "
            f"{summary.get('rejected', '')} | {summary.get('failures', '')} | "
            f"{summary.get('clipped', '')} | {goal} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attack_table")
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    text = table(args.experiment)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
