"""Packing speed per code width: ``pack_codes``/``unpack_codes`` against NumPy's own bit packing.

For every width k = 1..8, one ``resnet18``-sized vector of random k-bit codes (11.18M codes) is
packed and unpacked (best of ``--repeats``) by

* ``pack_codes`` + ``unpack_codes``: what the codecs call (the path it dispatches to is named);
* NumPy's bit packing: ``np.packbits``/``np.unpackbits`` for 1 bit, and for k bits the bit-matrix
  route ``np.packbits(np.unpackbits(codes[:, None])[:, :k])`` (and back), which is how k-bit
  streams are built from NumPy primitives alone and was this module's path for 3/5/6/7 bits;
* the uint64 group path (8 codes -> one word -> k bytes) on every width, to show where it beats
  the whole-code shifts (2/4 bits) and ``np.packbits`` (1 bit), which ``pack_codes`` keeps there.

Every route is checked to produce the same bytes before it is timed. Times are CPU seconds of
this process (best of N; ``benchmarks.common.Timing`` says why), single-threaded NumPy.

    python -m benchmarks.packing_speed [--repeats 5] [--count 11183562]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import best_of
from compression import packing
from compression.packing import pack_codes, unpack_codes

RESNET18_SCALARS = 11_183_562  # wire scalars of resnet18 (benchmarks.codec_speed measures it)


def numpy_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """k-bit stream from NumPy primitives: a (n, 8) LSB-first bit matrix cut to k columns."""
    if bits == 1:
        return np.packbits(codes, bitorder="little")
    bit_matrix = np.unpackbits(codes[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(bit_matrix.reshape(-1), bitorder="little")


def numpy_unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``numpy_pack``: the stream's bits, re-padded to 8 per code, packed to bytes."""
    if bits == 1:
        return np.unpackbits(packed, count=count, bitorder="little")
    stream = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    padded = np.zeros((count, 8), dtype=np.uint8)
    padded[:, :bits] = stream
    return np.packbits(padded, axis=1, bitorder="little").reshape(-1)


def dispatched_path(bits: int) -> str:
    """Which branch of ``pack_codes`` serves this width."""
    if bits == 1:
        return "np.packbits"
    if bits == 8:
        return "copy"
    return "code shifts" if 8 % bits == 0 else "uint64 groups"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--count", type=int, default=RESNET18_SCALARS, help="codes per vector")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    count = args.count
    rows = []
    print(f"{count:,} codes per width; pack + unpack CPU seconds, best of {args.repeats}\n")
    print(
        "| bits | pack_codes path | pack_codes + unpack | NumPy bit packing | ratio "
        "| uint64 groups path |"
    )
    print("|---|---|---|---|---|---|")
    for bits in range(1, 9):
        codes = np.random.default_rng(bits).integers(0, 2**bits, count, dtype=np.uint8)
        expected = numpy_pack(codes, bits)
        routes: dict[str, tuple[Callable[[], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
            "pack_codes": (
                lambda c=codes, b=bits: pack_codes(c, b),
                lambda p, b=bits: unpack_codes(p, b, count),
            ),
            "numpy": (
                lambda c=codes, b=bits: numpy_pack(c, b),
                lambda p, b=bits: numpy_unpack(p, b, count),
            ),
            "groups": (
                lambda c=codes, b=bits: packing._pack_groups(c, b),
                lambda p, b=bits: packing._unpack_groups(p, b, count),
            ),
        }
        seconds: dict[str, float] = {}
        for name, (pack, unpack) in routes.items():
            packed = pack()
            if not np.array_equal(packed, expected) or not np.array_equal(unpack(packed), codes):
                raise SystemExit(f"{name} disagrees with NumPy's packing at {bits} bits")
            seconds[name] = best_of(args.repeats, lambda p=pack, u=unpack: u(p())).cpu
        ratio = seconds["numpy"] / seconds["pack_codes"]
        print(
            f"| {bits} | {dispatched_path(bits)} | {seconds['pack_codes']:.4f} | "
            f"{seconds['numpy']:.4f} | {ratio:.1f}x | {seconds['groups']:.4f} |",
            flush=True,
        )
        rows.append({"bits": bits, "path": dispatched_path(bits), **seconds, "ratio": ratio})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"count": count, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
