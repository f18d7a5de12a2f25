"""Does a candidate LBI-FL agent environment make low widths cost accuracy? (issue: an agent
that acts needs an environment where UI4 ends at least 2 points below UI8 over 3 seeds.)

Trains constant-width runs of ``tools.lbi_agent.environment.BitWidthEnv`` (same initial
weights, batches and rounding noise per seed) and prints final held-out accuracy per seed, the
mean gap to the first width set, BitOPs per MAC and seconds per run. The environment flags are
``tools.lbi_agent.train``'s, so a probed setting is the one an agent then trains on:

    python -m benchmarks.lbi_env_probe --seeds 1 2 3 --widths 8,8,8 4,4,4 8,4,4 \
        --dataset fmnist --model lenet5 --train-fraction 0.167 --heldout-size 1000 --epochs 20 \
        --batch-size 64 --lr 0.05 --momentum 0 --wire --wire-every 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_json
from compression.lowbit import INT8, BitWidths, training_bitops
from tools.lbi_agent.environment import BitWidthEnv
from tools.lbi_agent.train import env_config, parse_args


def parse_widths(text: str) -> BitWidths:
    weight, activation, gradient = (int(v) for v in text.split(","))
    return BitWidths(weight, activation, gradient)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    own.add_argument("--widths", nargs="+", default=["8,8,8", "4,4,4", "8,4,4"])
    own.add_argument("--json", type=Path, default=None)
    mine, rest = own.parse_known_args(argv)
    args = parse_args(rest)
    torch.set_num_threads(args.threads)
    widths = [parse_widths(w) for w in mine.widths]
    finals: dict[str, list[float]] = {w: [] for w in mine.widths}
    seconds: dict[str, list[float]] = {w: [] for w in mine.widths}
    curves: dict[str, list[list[float]]] = {w: [] for w in mine.widths}
    for seed in mine.seeds:
        env = BitWidthEnv(env_config(args, seed))
        for name, width in zip(mine.widths, widths, strict=True):
            start = time.perf_counter()
            curve = env.constant_run(width)
            seconds[name].append(time.perf_counter() - start)
            finals[name].append(curve[-1])
            curves[name].append([round(a, 2) for a in curve[1:]])
            print(f"seed {seed} {name}: {' '.join(f'{a:.1f}' for a in curve[1:])}", flush=True)
    reference = np.asarray(finals[mine.widths[0]])
    print(
        f"\n{args.dataset}/{args.model}, {len(env.train_set)} images x {args.epochs} epochs, "
        f"wire={args.wire} every {args.wire_every or 'epoch'} steps, seeds {mine.seeds}"
    )
    print(
        "| widths (w,a,g) | final held-out % per seed | mean | vs first row (pts) "
        "| BitOPs/MAC vs INT8 | s/run |"
    )
    print("|---|---|---|---|---|---|")
    for name, width in zip(mine.widths, widths, strict=True):
        values = np.asarray(finals[name])
        ratio = training_bitops(1, width) / training_bitops(1, INT8)
        gaps = values - reference
        spread = float(np.std(gaps, ddof=1)) if len(gaps) > 1 else 0.0  # sample std
        print(
            f"| {name} | {' / '.join(f'{v:.1f}' for v in values)} | {values.mean():.2f} "
            f"| {gaps.mean():+.2f} ± {spread:.2f} "
            f"| {ratio:.2f} | {np.mean(seconds[name]):.0f} |"
        )
    if mine.json:
        write_json(mine.json, {"argv": argv, "final": finals, "curves": curves, "seconds": seconds})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
