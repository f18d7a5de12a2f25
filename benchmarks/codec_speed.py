"""Codec speed at ``resnet18`` size: encode + decode of a whole model update, per codec.

The data are random normal values with ``resnet18``'s tensor sizes (11.18M scalars). Every codec
is timed on the same arrays (best of ``--repeats``) through its own encode and decode functions
(the ones the clients and strategies call), and the packing routine is compared with NumPy's own
``np.packbits`` for 1-bit codes (``benchmarks.packing_speed`` compares every width). The
reference is one local epoch of FedAvg on ``resnet18`` (``--epoch-samples`` CIFAR-sized images,
batch 32) measured in the same run (before and after the codecs; the faster is kept), so each
codec's cost is reported as a share of that epoch (goal: under 3% of a round's compute). Shares
are ratios of CPU time (``benchmarks.common.Timing``): on a box shared with other jobs, wall time
stretches a 10 s epoch far more than a 0.1 s codec call that can run in a quiet moment. Run it
with ``OMP_NUM_THREADS=1`` so that both sides use one core.

    OMP_NUM_THREADS=1 python -m benchmarks.codec_speed [--repeats 3] [--epoch-samples 512]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import Timing, best_of, one_round
from compression import cuq_codec, fedbat_codec, fedbif_codec
from compression import sign_codec as sc
from compression import update_quantizers as uq
from compression.layout import concat_flat
from compression.packing import pack_codes, unpack_codes
from core.wire_state import get_wire_state, quantized_split
from fl_app.models import build_model


def codec_cases(seed: int = 0) -> tuple[int, dict[str, Callable[[], object]]]:
    """(scalars, {name: encode + decode of one resnet18-sized message}) for every codec."""
    model = build_model("resnet18", in_channels=3, num_classes=10, image_size=32)
    state = get_wire_state(model)
    sizes = [a.size for a in state]
    q_index, e_index, split = quantized_split(model)
    d = sum(sizes)
    rng = np.random.default_rng(seed)
    flat = rng.normal(0, 1e-3, d).astype(np.float32)
    weights = [rng.normal(0, 0.05, state[i].shape).astype(np.float32) for i in q_index]
    extras = concat_flat([state[i] for i in e_index], np.float16)
    nq = split.num_quantized
    gen = torch.Generator().manual_seed(seed)
    bits1 = (flat > 0).astype(np.uint8)
    codes3 = rng.integers(0, 8, d, dtype=np.uint8)
    codes4 = rng.integers(0, 16, d, dtype=np.uint8)
    words4 = rng.integers(0, 16, nq, dtype=np.uint8)
    steps = np.full(len(split.quantized_shapes), 0.01, dtype=np.float32)
    alphas = np.full(len(split.quantized_shapes), 0.01, dtype=np.float32)
    fedbat_bits = (rng.random(nq) > 0.5).astype(np.uint8)
    cuq_layout = cuq_codec.CuqLayout(split, 4, "layer")
    cuq = cuq_codec.CuqCodec(cuq_layout, with_errors=True)
    positions = (3,)
    fedbif_down = fedbif_codec.FedBiFDownlinkCodec(split, 4)
    fedbif_up = fedbif_codec.FedBiFUplinkCodec(split, 1)
    fedbat_up = fedbat_codec.FedBATUplinkCodec(split)
    sizes = tuple(sizes)

    def fedbif() -> None:  # server: encode words; client: decode, gather s bits, encode; server
        down = fedbif_down.encode(fedbif_codec.DownlinkMessage(words4, steps, extras))
        words = fedbif_down.decode(down).words
        codes = fedbif_codec.gather_codes(words, positions)
        up = fedbif_up.encode(fedbif_codec.UplinkMessage(codes, extras))
        fedbif_codec.spread_codes(fedbif_up.decode(up).codes, positions)

    def fedbat() -> None:
        up = fedbat_up.encode(fedbat_codec.UplinkMessage(fedbat_bits, alphas, extras))
        message = fedbat_up.decode(up)
        fedbat_codec.rebuild_update(message.bits, message.alphas, split.quantized_sizes)

    def clipped_uq() -> None:  # optimal clip per layer, stochastic 4-bit codes, then decode
        codes, clips, errors, _ = cuq_codec.quantize_layers(weights, cuq_layout, "stochastic", gen)
        arrays = cuq.encode(cuq_codec.CuqMessage(codes, clips, errors, extras))
        cuq_codec.dequantize_layers(cuq.decode(arrays), cuq_layout)

    def symmetric(levels: int) -> Callable[[], object]:
        codec = uq.SymmetricCodec(sizes, levels)

        def work() -> object:
            arrays = codec.encode(uq.quantize_symmetric(flat, sizes, levels, gen))
            return uq.dequantize_symmetric(codec.decode(arrays), sizes)

        return work

    def feddq(step: float) -> Callable[[], object]:
        codec = uq.FixedStepCodec(sizes)

        def work() -> object:
            arrays = codec.encode(uq.quantize_fixed_step(flat, sizes, step, gen))
            return uq.dequantize_fixed_step(codec.decode(arrays), sizes)

        return work

    def qsgd() -> object:
        codec = uq.QSGDCodec(d, 15, 512)
        arrays = codec.encode(uq.quantize_qsgd(flat, 15, 512, gen))
        return uq.dequantize_qsgd(codec.decode(arrays), 15, 512)

    signs = sc.SignCodec(d, 0)
    scaled = sc.ScaledSignCodec(sizes, 0)
    no_stats = np.zeros(0, np.float16)

    def ef_signsgd() -> object:
        message = scaled.decode(
            scaled.encode(sc.ScaledSignMessage(*sc.scaled_sign(flat, sizes), no_stats))
        )
        return sc.scaled_sign_values(message.signs, message.scales, sizes)

    cases: dict[str, Callable[[], object]] = {
        "np.packbits + np.unpackbits (1 bit)": lambda: np.unpackbits(np.packbits(bits1), count=d),
        "pack_codes + unpack_codes (1 bit)": lambda: unpack_codes(pack_codes(bits1, 1), 1, d),
        "pack_codes + unpack_codes (3 bit)": lambda: unpack_codes(pack_codes(codes3, 3), 3, d),
        "pack_codes + unpack_codes (4 bit)": lambda: unpack_codes(pack_codes(codes4, 4), 4, d),
        "FedBiF codec (4-bit down + 1-bit up)": fedbif,
        "FedBAT codec (1-bit up + rebuild)": fedbat,
        "clipped-uq 4 bit (optimal clips)": clipped_uq,
        "SignSGD signs": lambda: signs.decode(signs.encode(sc.SignMessage(flat, no_stats))),
        "EF-SignSGD scaled sign": ef_signsgd,
        "FedPAQ 4-bit (7 levels)": symmetric(7),
        f"DAdaQuant 2 levels ({uq.symmetric_bits(2)} bit)": symmetric(2),
        "QSGD 15 levels": qsgd,
        "FedDQ step 5e-4 (5-6 bit)": feddq(5e-4),
        "FedDQ step 2e-3 (3-4 bit)": feddq(2e-3),
    }
    return d, cases


def epoch_timing(samples: int) -> Timing:
    """One FedAvg local epoch on ``resnet18`` (the client's whole ``fit``), on both clocks."""
    measure = one_round("fedavg", "resnet18", samples=samples)
    return Timing(measure.fit_seconds, measure.fit_cpu_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epoch-samples", type=int, default=512)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    d, cases = codec_cases()
    # The epoch is timed before and after the codecs and the faster one kept, as the codecs are
    # best-of-N: on a shared box, both sides of the ratio are then the least disturbed runs.
    epochs = [epoch_timing(args.epoch_samples)]
    timings = {name: best_of(args.repeats, work) for name, work in cases.items()}
    epochs.append(epoch_timing(args.epoch_samples))
    epoch = Timing(min(e.wall for e in epochs), min(e.cpu for e in epochs))
    print(
        f"resnet18: {d:,} scalars; one FedAvg local epoch on {args.epoch_samples} images: "
        f"{epoch.cpu:.2f} s CPU, {epoch.wall:.2f} s wall (before/after the codecs: "
        f"{epochs[0].wall:.2f} / {epochs[1].wall:.2f} s wall)\n"
    )
    print("| codec (encode + decode, whole model) | CPU s | share of the epoch (CPU) | wall s |")
    print("|---|---|---|---|")
    rows = []
    for name, t in timings.items():
        rows.append({"codec": name, "cpu": t.cpu, "wall": t.wall, "share": t.cpu / epoch.cpu})
        print(f"| {name} | {t.cpu:.3f} | {t.cpu / epoch.cpu:.1%} | {t.wall:.3f} |", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "scalars": d,
            "epoch_samples": args.epoch_samples,
            "epochs": [vars(e) for e in epochs],
        }
        args.json.write_text(json.dumps({**payload, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
