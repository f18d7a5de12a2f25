"""Does the clip search find the global minimum of the error it minimises? Against brute force.

For every width 2..8, both roundings, and rows of Gaussian, Laplace and real layer weights
(FMNIST's CNN4 after a few steps of training is not needed: its and resnet18's initial weights
are the real layers here, plus the last conv of CNN4), the clip of ``compression.clipping.
mse_clip`` is compared with a brute-force minimiser of the exact squared error J(s) on the raw
values (``brute_force_clip``: a dense grid over (0, max|x|], then golden section in the best
cell). Reported: how far the search's clip and its exact error are from the brute force's, and
the search's time.

    .venv/bin/python -m benchmarks.clip_search [--size 100000] [--json PATH]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch

from compression.clipping import ROUNDINGS, mse_clip, rounding_error

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def exact_error(magnitude: torch.Tensor, clip: float, bits: int, rounding: str) -> float:
    """J(s) on the raw values (float64): clipping error outside, rounding error inside."""
    outside = magnitude > clip
    clipped = (magnitude[outside] - clip).square().sum()
    step = 2.0 * clip / (2**bits - 1)
    inside = magnitude[~outside]
    grid = rounding_error((inside + clip) / step, rounding).sum() * step**2
    return float(clipped + grid)


def brute_force_clip(
    magnitude: torch.Tensor, bits: int, rounding: str, points: int = 4000
) -> tuple[float, float]:
    """(clip, J) minimising J over a dense grid of (0, max|x|], then golden section in the
    best grid cell."""
    peak = float(magnitude.max())
    grid = [peak * (k + 1) / points for k in range(points)]
    errors = [exact_error(magnitude, s, bits, rounding) for s in grid]
    best = min(range(points), key=errors.__getitem__)
    left = grid[max(best - 1, 0)]
    right = grid[min(best + 1, points - 1)]
    a, b = right - GOLDEN * (right - left), left + GOLDEN * (right - left)
    ea, eb = exact_error(magnitude, a, bits, rounding), exact_error(magnitude, b, bits, rounding)
    for _ in range(40):
        if ea <= eb:
            right, b, eb = b, a, ea
            a = right - GOLDEN * (right - left)
            ea = exact_error(magnitude, a, bits, rounding)
        else:
            left, a, ea = a, b, eb
            b = left + GOLDEN * (right - left)
            eb = exact_error(magnitude, b, bits, rounding)
    candidates = [(errors[best], grid[best]), (ea, a), (eb, b)]
    error, clip = min(candidates)
    return clip, error


def populations(size: int) -> dict[str, torch.Tensor]:
    from fl_app.models import build_model

    generator = torch.Generator().manual_seed(0)
    rows = {
        "gaussian": torch.randn(size, generator=generator, dtype=torch.float64),
        "laplace": torch.distributions.Laplace(0.0, 1.0).sample((size,)).double(),
    }
    torch.manual_seed(0)
    cnn4 = build_model("cnn4-fedbat", in_channels=1, num_classes=10, image_size=28)
    weights = [p for name, p in cnn4.named_parameters() if p.dim() > 1]
    rows["cnn4 conv3 (init)"] = weights[2].detach().double().reshape(-1)[:size]
    resnet = build_model("resnet18", in_channels=3, num_classes=10, image_size=32)
    layer = [p for name, p in resnet.named_parameters() if p.dim() > 1][10]
    rows["resnet18 layer (init)"] = layer.detach().double().reshape(-1)[:size]
    return rows


def measure(size: int, channels: int) -> list[dict[str, Any]]:
    """Each population as one row (a layer's clip) and as ``channels`` rows (per-channel clips,
    searched together as ``cuq-granularity=channel`` does; the first 4 rows are checked)."""
    results = []
    for name, values in populations(size).items():
        for granularity, rows in (
            ("layer", values.reshape(1, -1)),
            ("channel", values[: values.numel() // channels * channels].reshape(channels, -1)),
        ):
            for bits in range(2, 9):
                for rounding in ROUNDINGS:
                    results += compare(name, granularity, rows, bits, rounding)
    return results


def compare(
    name: str, granularity: str, rows: torch.Tensor, bits: int, rounding: str
) -> list[dict[str, Any]]:
    started = time.perf_counter()
    clips = mse_clip(rows, bits, rounding)
    seconds = time.perf_counter() - started
    out = []
    for index in range(min(4, rows.shape[0])):
        magnitude = rows[index].abs()
        clip = float(clips[index])
        error = exact_error(magnitude, clip, bits, rounding)
        best_clip, best_error = brute_force_clip(magnitude, bits, rounding)
        row = {
            "population": name,
            "granularity": granularity,
            "values": int(magnitude.numel()),
            "bits": bits,
            "rounding": rounding,
            "clip_off": clip / best_clip - 1.0,
            "error_off": error / best_error - 1.0,
            "seconds": seconds,
        }
        out.append(row)
        print(
            f"{name:22s} {granularity:7s} B={bits} {rounding:13s} clip "
            f"{100 * row['clip_off']:+.2f}% error {100 * row['error_off']:+.3f}% "
            f"({seconds * 1e3:.0f} ms)",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure(args.size, args.channels)
    worst_clip = max(abs(r["clip_off"]) for r in rows)
    worst_error = max(r["error_off"] for r in rows)
    print(f"\nworst: clip {100 * worst_clip:.2f}% off, error {100 * worst_error:+.3f}%")
    if args.json:
        from benchmarks.common import write_json

        write_json(args.json, {"size": args.size, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
