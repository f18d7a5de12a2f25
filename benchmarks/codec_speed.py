"""Codec speed at ``resnet18`` size: encode + decode of a whole model update, per codec.

The data are random normal values with ``resnet18``'s tensor sizes (11.17M scalars). Every codec
is timed on the same arrays (best of ``--repeats``), and the packing routine is compared with
NumPy's own ``np.packbits`` for 1-bit codes. The reference is one local epoch of FedAvg on
``resnet18`` (``--epoch-samples`` CIFAR-sized images, batch 32) measured in the same run, so each
codec's cost is reported as a share of that epoch (goal: under 3% of a round's compute).

    python -m benchmarks.codec_speed [--repeats 3] [--epoch-samples 512]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.common import one_round
from compression.packing import pack_codes, unpack_codes
from compression.sign_codec import decode_scaled_sign, encode_scaled_sign, pack_signs, unpack_signs
from compression.update_quantizers import (
    decode_fixed_step,
    decode_qsgd,
    decode_symmetric,
    encode_fixed_step,
    encode_qsgd,
    encode_symmetric,
)
from fl_app.models import build_model
from fl_app.torch_utils import get_wire_state


def best_of(repeats: int, work: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epoch-samples", type=int, default=512)
    args = parser.parse_args()

    sizes = [
        a.size
        for a in get_wire_state(
            build_model("resnet18", in_channels=3, num_classes=10, image_size=32)
        )
    ]
    d = sum(sizes)
    flat = np.random.default_rng(0).normal(0, 1e-3, d).astype(np.float32)
    gen = torch.Generator().manual_seed(0)
    bits1 = (flat > 0).astype(np.uint8)
    codes4 = np.random.default_rng(1).integers(0, 16, d, dtype=np.uint8)

    def fedbif_like() -> None:  # pack 4-bit words (downlink) and 1-bit codes (uplink), unpack
        unpack_codes(pack_codes(codes4, 4), 4, d)
        unpack_codes(pack_codes(bits1, 1), 1, d)

    cases: dict[str, Callable[[], object]] = {
        "np.packbits + np.unpackbits (1 bit)": lambda: np.unpackbits(np.packbits(bits1), count=d),
        "pack_codes + unpack_codes (1 bit)": lambda: unpack_codes(pack_codes(bits1, 1), 1, d),
        "pack_codes + unpack_codes (4 bit)": lambda: unpack_codes(pack_codes(codes4, 4), 4, d),
        "FedBiF wire (4-bit down + 1-bit up)": fedbif_like,
        "SignSGD signs": lambda: unpack_signs(pack_signs(flat), d),
        "EF-SignSGD scaled sign": lambda: decode_scaled_sign(
            *encode_scaled_sign(flat, sizes), sizes
        ),
        "FedPAQ 4-bit (7 levels)": lambda: decode_symmetric(
            *encode_symmetric(flat, sizes, 7, gen), sizes, 7
        ),
        "QSGD 15 levels": lambda: decode_qsgd(*encode_qsgd(flat, 15, 512, gen), d, 15, 512),
        "FedDQ step 5e-4": lambda: decode_fixed_step(
            *encode_fixed_step(flat, sizes, 5e-4, gen), sizes
        ),
    }
    epoch = one_round("fedavg", "resnet18", samples=args.epoch_samples).fit_seconds
    print(
        f"resnet18: {d:,} scalars; one FedAvg local epoch on {args.epoch_samples} images: "
        f"{epoch:.2f} s\n"
    )
    print("| codec (encode + decode, whole model) | seconds | share of the epoch |")
    print("|---|---|---|")
    for name, work in cases.items():
        try:
            seconds = best_of(args.repeats, work)
        except TypeError as err:  # a codec whose signature this script does not know
            print(f"| {name} | failed: {err} | |")
            continue
        print(f"| {name} | {seconds:.3f} | {seconds / epoch:.1%} |", flush=True)


if __name__ == "__main__":
    main()
