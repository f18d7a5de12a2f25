"""How far each message is from its own limit: coded bits against the entropy of what is coded.

A message cannot be shorter than the information it carries given what the receiver holds. For
every method whose codes go through the ANS stage, this runs ``--rounds`` rounds with one client
(``benchmarks.common.run_rounds``: the method's own strategy and client, Flower's serialization,
synthetic data of the model's input shape) with ``entropy=ans`` and every reference stage that
applies to it (``downlink-reference=last``, ``uplink-reference=received``), and records each
coded stream (``compression.entropy.recording``) of the last round, when references are in use.

Per method and direction: the symbols coded (after reference differencing), their empirical
entropy (order 0, per stream as coded), the stream's payload (the ANS model and words, or the raw
packing) against it, and apart from it the stream headers and everything else the message
carries (float extras, scales, ``.npy`` headers); bpp is the whole message's.

    .venv/bin/python -m benchmarks.wire_limit [--models resnet18] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import run_rounds, write_json
from compression.entropy import StreamRecord

#: (row label, strategy, run-config keys): every method with an ANS-coded stream, at the
#: lossless stages that apply to it.
ROWS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("fedbif", "fedbif", {"downlink-reference": "last", "uplink-reference": "received"}),
    ("lbi-fl ui4", "lbi-fl", {"lbi-mode": "ui4", "uplink-reference": "received"}),
    ("lbi-fl ui8", "lbi-fl", {"lbi-mode": "ui8", "uplink-reference": "received"}),
    ("fedpaq", "fedpaq", {}),
    ("qsgd", "qsgd", {}),
    ("dadaquant", "dadaquant", {}),
    ("clipped-uq", "clipped-uq", {}),
    ("fedavg, downlink=uq", "fedavg", {"downlink": "uq", "downlink-reference": "last"}),
)


def summarize(streams: list[StreamRecord]) -> dict[str, float]:
    """Totals of a direction's streams: symbols, entropy bits, payload bits, header bytes."""
    symbols = sum(s.count for s in streams)
    limit = sum(s.entropy_bits for s in streams)
    coded = sum(8 * s.coded_bytes for s in streams)
    return {
        "streams": len(streams),
        "symbols": symbols,
        "entropy_bits_per_symbol": limit / symbols if symbols else float("nan"),
        "coded_bits_per_symbol": coded / symbols if symbols else float("nan"),
        "coded_over_entropy": coded / limit if limit else float("nan"),
        "stream_header_bytes": sum(s.header_bytes for s in streams),
        "coded_bytes": coded // 8,
        "ans_streams": sum(s.mode == "ans" for s in streams),
    }


def sent(streams: list[StreamRecord], arrays: list[np.ndarray]) -> list[StreamRecord]:
    """The streams that went out in ``arrays`` (a server may code a message it does not send:
    FedBiF builds the full words once per round, then the difference a client gets)."""
    digests = {zlib.crc32(a.tobytes()) for a in arrays if a.dtype == np.uint8}
    return [s for s in streams if s.digest in digests]


def measure(model: str, rounds: int, samples: int) -> list[dict[str, Any]]:
    rows = []
    for label, strategy, keys in ROWS:
        measures = run_rounds(strategy, model, rounds, samples, entropy="ans", **keys)
        last = measures[-1]
        for direction, streams, message_bytes, bpp in (
            (
                "down",
                sent(last.downlink_streams, last.downlink),
                last.downlink_bytes,
                last.downlink_bpp,
            ),
            ("up", sent(last.uplink_streams, last.uplink), last.uplink_bytes, last.uplink_bpp),
        ):
            if not streams:
                continue
            stats = summarize(streams)
            rows.append(
                {
                    "model": model,
                    "method": label,
                    "direction": direction,
                    **stats,
                    "other_bytes": message_bytes
                    - stats["coded_bytes"]
                    - stats["stream_header_bytes"],
                    "message_bytes": message_bytes,
                    "message_bpp": bpp,
                }
            )
            print(
                f"{model} {label} {direction}: H {stats['entropy_bits_per_symbol']:.4f} "
                f"coded {stats['coded_bits_per_symbol']:.4f} bits/symbol "
                f"({100 * (stats['coded_over_entropy'] - 1):+.2f}%), bpp {bpp:.3f}",
                flush=True,
            )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | way | symbols | entropy bits/sym | coded bits/sym | coded / entropy "
        "| stream headers B | other B | message bpp |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['direction']} | {r['symbols']:,} | "
            f"{r['entropy_bits_per_symbol']:.4f} | {r['coded_bits_per_symbol']:.4f} | "
            f"{100 * (r['coded_over_entropy'] - 1):+.2f}% | {r['stream_header_bytes']} | "
            f"{r['other_bytes']:,} | {r['message_bpp']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=64, help="images of the one client")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = [row for model in args.models for row in measure(model, args.rounds, args.samples)]
    print()
    print(markdown(rows))
    if args.json:
        write_json(args.json, {"rounds": args.rounds, "samples": args.samples, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
