"""Does a candidate LBI-FL agent environment make low widths cost accuracy? (issue: an agent
that acts needs an environment where UI4 ends at least 2 points below UI8 over 3 seeds.)

Trains constant-width runs of ``tools.lbi_agent.environment.BitWidthEnv`` (same initial
weights, batches and rounding noise per seed) and prints final held-out accuracy per seed, the
mean gap to INT8, BitOPs per MAC and seconds per run:

    python -m benchmarks.lbi_env_probe --dataset fmnist --model lenet5 --train-fraction 0.167 \\
        --epochs 10 --wire --wire-every 10 --seeds 1 2 3 [--widths 8,8,8 4,4,4 8,4,4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from compression.lowbit import INT8, BitWidths, training_bitops
from tools.lbi_agent.environment import BitWidthEnv, EnvConfig


def parse_widths(text: str) -> BitWidths:
    weight, activation, gradient = (int(v) for v in text.split(","))
    return BitWidths(weight, activation, gradient)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fmnist")
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--train-fraction", type=float, default=0.167)
    parser.add_argument("--heldout-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--wire", action="store_true")
    parser.add_argument("--wire-every", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--widths", nargs="+", default=["8,8,8", "4,4,4", "8,4,4"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    widths = [parse_widths(w) for w in args.widths]
    finals: dict[str, list[float]] = {w: [] for w in args.widths}
    seconds: dict[str, list[float]] = {w: [] for w in args.widths}
    curves: dict[str, list[list[float]]] = {w: [] for w in args.widths}
    for seed in args.seeds:
        cfg = EnvConfig(
            dataset=args.dataset,
            model=args.model,
            train_fraction=args.train_fraction,
            heldout_size=args.heldout_size,
            epochs=args.epochs,
            start=1,
            batch_size=args.batch_size,
            lr=args.lr,
            momentum=args.momentum,
            wire=args.wire,
            wire_every=args.wire_every,
            seed=seed,
        )
        env = BitWidthEnv(cfg)
        for name, width in zip(args.widths, widths, strict=True):
            start = time.perf_counter()
            curve = env.constant_run(width)
            seconds[name].append(time.perf_counter() - start)
            finals[name].append(curve[-1])
            curves[name].append([round(a, 2) for a in curve[1:]])
            print(f"seed {seed} {name}: {' '.join(f'{a:.1f}' for a in curve[1:])}", flush=True)
    reference = np.asarray(finals[args.widths[0]])
    print(
        f"\n{args.dataset}/{args.model}, {len(env.train_set)} images x {args.epochs} epochs, "
        f"wire={args.wire} every {args.wire_every or 'epoch'} steps, seeds {args.seeds}"
    )
    print(
        "| widths (w,a,g) | final held-out % per seed | mean | vs first row (pts) "
        "| BitOPs/MAC vs INT8 | s/run |"
    )
    print("|---|---|---|---|---|---|")
    for name, width in zip(args.widths, widths, strict=True):
        values = np.asarray(finals[name])
        ratio = training_bitops(1, width) / training_bitops(1, INT8)
        print(
            f"| {name} | {' / '.join(f'{v:.1f}' for v in values)} | {values.mean():.2f} "
            f"| {np.mean(values - reference):+.2f} ± {np.std(values - reference):.2f} "
            f"| {ratio:.2f} | {np.mean(seconds[name]):.0f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"json": str(args.json)},
                    "final": finals,
                    "curves": curves,
                    "seconds": seconds,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
