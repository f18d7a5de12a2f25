"""What the lossless entropy stage saves, and what it costs.

    python -m benchmarks.entropy_bench [--epochs 10] [--resnet-samples 500,5000]

1. Codes of a trained model: the digits CNN is trained centrally (``--epochs`` over the digits
   training split, seed 0), then its weights are coded as ``downlink=uq`` codes (4 bits, per
   channel), FedBiF-style grid words (4 bits, alpha = max|w| / 8 per tensor, stochastic), and one
   local epoch's update as FedPAQ (4 bits) and QSGD (15 levels: sign bit + 4-bit magnitude)
   codes. For each: nominal bits per code, the empirical entropy, and the measured bits per code
   of ``compression.entropy.encode`` (header and model included).
2. Cost on resnet18 (11 M weights, CIFAR-10 shape): encode + decode seconds of its 4-bit
   ``uq`` codes against one local epoch of each ``--resnet-samples`` count of images (batch 32)
   on one CPU thread, measured in the same run; the ratios are the figures to quote.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from compression import entropy
from compression.downlink_codec import DownlinkLayout, encode_uq
from compression.packing import unpack_codes
from compression.update_quantizers import quantize_qsgd, quantize_symmetric


def trained_digits_model(epochs: int) -> tuple[nn.Module, nn.Module]:
    """(model after ``epochs`` central epochs, the same model after one more epoch)."""
    from sklearn.datasets import load_digits

    from fl_app.models import build_model

    torch.manual_seed(0)
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target)
    model = build_model("digits-cnn-bn", in_channels=1, num_classes=10, image_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def epoch() -> None:
        order = torch.randperm(len(labels))
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()

    for _ in range(epochs):
        epoch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    epoch()
    after = model
    previous = build_model("digits-cnn-bn", in_channels=1, num_classes=10, image_size=8)
    previous.load_state_dict(before)
    return previous, after


def weights_of(model: nn.Module) -> list[np.ndarray]:
    return [p.detach().numpy().astype(np.float32) for p in model.parameters()]


def measure(name: str, symbols: np.ndarray, bits: int) -> str:
    stream = entropy.encode(symbols, bits)
    np.testing.assert_array_equal(entropy.decode(stream, bits, symbols.size), symbols)
    coded = 8 * stream.size / max(1, symbols.size)
    return (
        f"| {name} | {symbols.size:,} | {bits} | {entropy.entropy_bits(symbols, bits):.3f} | "
        f"{coded:.3f} | {100 * (1 - coded / bits):.1f}% |"
    )


def code_table(epochs: int) -> list[str]:
    previous, model = trained_digits_model(epochs)
    weights = [w for w in weights_of(model) if w.ndim >= 2]
    shapes = tuple(w.shape for w in weights)
    uq = encode_uq(weights, DownlinkLayout(shapes, True), 4)
    uq_codes = unpack_codes(uq[0], 4, sum(w.size for w in weights))
    rng = np.random.default_rng(0)
    grid = []
    for w in weights:
        alpha = np.abs(w).max() / 8
        scaled = np.clip(w / alpha + 8, 0, 15)
        grid.append(np.floor(scaled + rng.random(w.shape)).clip(0, 15).astype(np.uint8).ravel())
    update = np.concatenate(
        [(a - b).ravel() for a, b in zip(weights_of(model), weights_of(previous), strict=True)]
    )
    sizes = [p.numel() for p in model.parameters()]
    generator = torch.Generator().manual_seed(0)
    paq = quantize_symmetric(update, sizes, 7, generator)
    qsgd = quantize_qsgd(update, 15, 512, generator)
    return [
        f"digits-cnn-bn after {epochs} central epochs (seed 0):",
        "",
        "| codes | count | nominal bits | entropy (bits) | coded bits/code | saved |",
        "|---|---|---|---|---|---|",
        measure("downlink uq, 4 bit, per channel", uq_codes, 4),
        measure("FedBiF-style 4-bit words (alpha = max/8)", np.concatenate(grid), 4),
        measure("FedPAQ 4-bit update codes", (paq.codes + 7).astype(np.uint8), 4),
        measure("QSGD 15-level magnitudes", qsgd.magnitudes, 4),
        measure("QSGD signs", qsgd.signs, 1),
    ]


def best_seconds(run: Callable[[], object], repeats: int = 3) -> float:
    """Fastest of ``repeats`` timed calls (after one warm-up call: imports, first allocations)."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def cost_table(sample_counts: list[int]) -> list[str]:
    import torchvision

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    weights = [w for w in weights_of(model) if w.ndim >= 2]
    layout = DownlinkLayout(tuple(w.shape for w in weights), True)
    codes = unpack_codes(encode_uq(weights, layout, 4)[0], 4, layout.num_codes)
    stream = entropy.encode(codes, 4)
    encode_seconds = best_seconds(lambda: entropy.encode(codes, 4))
    decode_seconds = best_seconds(lambda: entropy.decode(stream, 4, codes.size))
    stage = encode_seconds + decode_seconds
    count = layout.num_codes
    lines = [
        f"resnet18 (CIFAR-10 shape, {count:,} quantized weights, initial weights, 1 thread; "
        "encode and decode: best of 3 after a warm-up):",
        "",
        "| 4-bit uq codes | coded bits/code | encode s | decode s | images per epoch "
        "| one local epoch s | entropy stage / epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for samples in sample_counts:
        images = torch.randn(samples, 3, 32, 32)
        labels = torch.randint(0, 10, (samples,))
        started = time.perf_counter()
        for start in range(0, samples, 32):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(
                model(images[start : start + 32]), labels[start : start + 32]
            )
            loss.backward()
            optimizer.step()
        epoch_seconds = time.perf_counter() - started
        lines.append(
            f"| ans | {8 * stream.size / count:.3f} (of 4) | {encode_seconds:.3f} | "
            f"{decode_seconds:.3f} | {samples} | {epoch_seconds:.2f} | "
            f"{100 * stage / epoch_seconds:.1f}% |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--resnet-samples",
        default="500,5000",
        help="images per local epoch, comma-separated (500: a CIFAR-10 client of 100; "
        "5000: one of 10)",
    )
    args = parser.parse_args(argv)
    print("\n".join(code_table(args.epochs)))
    print()
    print("\n".join(cost_table([int(n) for n in args.resnet_samples.split(",")])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
