"""Compare a trained LBI-FL agent with fixed and random schedules on fresh environments.

    python -m tools.lbi_agent.compare --agent clients/lbi_agent_fmnist.json \\
        --seeds 2001 2002 2003 --json benchmarks/results/lbi-agent/compare-fmnist.json \\
        [the environment flags of tools.lbi_agent.train, as the agent was trained]

Per environment seed (seeds the agent never trained on: other initial weights, data subset,
batch order and rounding noise), every schedule trains from the same start: FP32 (no
quantization, float32 wire), UI8 and UI4 (constant widths), ``random`` (a uniform draw among the
valid actions at every decision), ``random-matched`` (the agent's own raises at random
decisions: the same BitOPs budget, other timing) and the agent acting greedily. The table has the
final held-out accuracy (mean ± std over seeds), the gap to UI8, and the training BitOPs against
UI8's (the paper's "RR" is 1 minus that); the agent's schedule per seed follows.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.lbi_agent import BitWidthAgent
from compression.lowbit import FP32, INT8, training_bitops
from tools.lbi_agent.environment import (
    BitWidthEnv,
    Episode,
    agent_policy,
    matched_random_plan,
    plan_policy,
    run_episode,
    uniform_random_policy,
)
from tools.lbi_agent.train import env_config, parse_args

#: seed salt of the random schedules.
_COMPARE_SALT = 0xC0A


def _row(accuracy: float, bitops_vs_int8: float, **extra: Any) -> dict[str, Any]:
    return {"accuracy": accuracy, "bitops_vs_int8": bitops_vs_int8, **extra}


def _episode_row(episode: Episode) -> dict[str, Any]:
    return _row(
        episode.accuracy,
        1.0 - episode.compression_ratio,
        schedule=[[round(t, 4), a] for t, a in episode.schedule],
        widths=list(episode.widths.as_tuple()),
    )


def compare_on(agent: BitWidthAgent, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Every schedule of the module docstring on the fresh environment ``seed``."""
    env = BitWidthEnv(env_config(args, seed))
    fp32 = env.constant_run(FP32)
    reference = env.run_reference()
    rng = np.random.default_rng([seed, _COMPARE_SALT])
    greedy = run_episode(env, agent_policy(agent))
    raises = [t.action for t in greedy.transitions if t.action]
    decisions = len(env.cfg.decision_epochs)
    rows = {
        "fp32": _row(fp32[-1], training_bitops(1, FP32) / training_bitops(1, INT8)),
        "ui8": _row(reference.accuracy[-1], 1.0),
        "ui4": _episode_row(run_episode(env, plan_policy({}))),
        "random": _episode_row(run_episode(env, uniform_random_policy(rng))),
        "random-matched": _episode_row(
            run_episode(env, plan_policy(matched_random_plan(raises, decisions, rng)))
        ),
        "agent": _episode_row(greedy),
    }
    return {"env_seed": seed, "rows": rows}


def table(results: Sequence[dict[str, Any]]) -> str:
    names = list(results[0]["rows"])
    lines = [
        "| schedule | final held-out % (mean ± std) | vs UI8 (pts) | training BitOPs vs UI8 |",
        "|---|---|---|---|",
    ]
    ui8 = np.array([r["rows"]["ui8"]["accuracy"] for r in results])
    for name in names:
        acc = np.array([r["rows"][name]["accuracy"] for r in results])
        ops = np.array([r["rows"][name]["bitops_vs_int8"] for r in results])
        gap = acc - ui8
        lines.append(
            f"| {name} | {acc.mean():.2f} ± {acc.std(ddof=1) if len(acc) > 1 else 0:.2f} "
            f"| {gap.mean():+.2f} | {ops.mean():.3f} |"
        )
    for result in results:
        agent = result["rows"]["agent"]
        steps = " ".join(f"t={t:.2f} {a}" for t, a in agent["schedule"]) or "no raise"
        lines.append(
            f"\nagent on env seed {result['env_seed']}: {steps} -> widths {agent['widths']}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--agent", type=Path, required=True)
    own.add_argument("--seeds", type=int, nargs="+", default=[2001, 2002, 2003])
    own.add_argument("--json", type=Path, default=None)
    mine, rest = own.parse_known_args(argv)
    args = parse_args(rest)
    torch.set_num_threads(args.threads)
    agent = BitWidthAgent.load(mine.agent)
    results = []
    for seed in mine.seeds:
        results.append(compare_on(agent, args, seed))
        rows = results[-1]["rows"]
        print(
            f"env seed {seed}: "
            + ", ".join(f"{name} {row['accuracy']:.1f}" for name, row in rows.items()),
            flush=True,
        )
    text = table(results)
    print(text)
    if mine.json:
        mine.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"agent": str(mine.agent), "argv": argv, "results": results, "table": text}
        mine.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
