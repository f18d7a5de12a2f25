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
    .venv/bin/python -m benchmarks.wire_limit --experiment experiments/fedbif-wire-fmnist.toml

With ``--experiment``, every point of that grid runs in one process (``tools.inprocess``, where
the harness's ``--runner inprocess`` would write it, so ``tools.experiment report`` reads them)
with every stream recorded: per point and direction, all rounds' sent streams against their
entropy, beside the run's measured bpp.
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import run_rounds, write_json
from compression.entropy import StreamRecord, recording

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


def run_recorded(config: dict[str, Any], clients: int) -> dict[str, list[StreamRecord]]:
    """Run ``config`` in one process; the streams the server sent (down) and the clients sent
    (up), over all rounds. A downlink stream counts only if its array went out (FedBiF codes its
    full words every round, then sends most clients a difference)."""
    from flwr.common import parameters_to_ndarrays

    from strategies.base import CommunicationStrategy
    from tools.inprocess import InProcessClientProxy, run_inprocess

    down: list[StreamRecord] = []
    up: list[StreamRecord] = []
    sent_digests: list[int] = []  # one per array sent: a message sent to many counts many times
    configure_fit = CommunicationStrategy.configure_fit
    downlink_parameters = CommunicationStrategy.downlink_parameters
    fit = InProcessClientProxy.fit

    def recorded_configure_fit(self, *args, **kwargs):  # noqa: ANN001, ANN202
        with recording() as streams:
            result = configure_fit(self, *args, **kwargs)
        down.extend(streams)
        return result

    def recorded_downlink_parameters(self, *args, **kwargs):  # noqa: ANN001, ANN202
        parameters = downlink_parameters(self, *args, **kwargs)
        for array in parameters_to_ndarrays(parameters):
            if array.dtype == np.uint8:
                sent_digests.append(zlib.crc32(array.tobytes()))
        return parameters

    def recorded_fit(self, *args, **kwargs):  # noqa: ANN001, ANN202
        with recording() as streams:
            result = fit(self, *args, **kwargs)
        up.extend(streams)
        return result

    CommunicationStrategy.configure_fit = recorded_configure_fit  # type: ignore[method-assign]
    CommunicationStrategy.downlink_parameters = recorded_downlink_parameters  # type: ignore[method-assign]
    InProcessClientProxy.fit = recorded_fit  # type: ignore[method-assign]
    try:
        run_inprocess(config, num_clients=clients)
    finally:
        CommunicationStrategy.configure_fit = configure_fit  # type: ignore[method-assign]
        CommunicationStrategy.downlink_parameters = downlink_parameters  # type: ignore[method-assign]
        InProcessClientProxy.fit = fit  # type: ignore[method-assign]
    coded = {s.digest: s for s in down}
    return {"down": [coded[d] for d in sent_digests if d in coded], "up": up}


def measure_experiment(path: Path) -> list[dict[str, Any]]:
    """Every unfinished point of the grid at ``path``, recorded (finished ones are skipped,
    as the harness skips them; their streams are not re-measured)."""
    import json

    from tools.experiment import is_finished, load_experiment

    experiment = load_experiment(path)
    clients = int(experiment.federation.get("num-supernodes", 10))
    rows = []
    for point in experiment.points():
        folder = experiment.folder / point.name
        if is_finished(folder):
            print(f"{point.name}: done already, skipped")
            continue
        config = {**point.config, "results-dir": str(experiment.folder), "run-name": point.name}
        streams = run_recorded(config, clients)
        summary = json.loads((folder / "summary.json").read_text())
        for direction, records in streams.items():
            stats = summarize(records) if records else {}
            rows.append(
                {
                    "model": f"{point.name} (all rounds)",
                    "method": summary["strategy"],
                    "direction": direction,
                    **stats,
                    "other_bytes": summary[f"{'up' if direction == 'up' else 'down'}link_bytes"]
                    - stats.get("coded_bytes", 0)
                    - stats.get("stream_header_bytes", 0),
                    "message_bpp": summary[f"{'up' if direction == 'up' else 'down'}link_bpp"],
                }
            )
        print(f"{point.name}: final accuracy {summary['final_accuracy']:.4f}", flush=True)
    return [r for r in rows if "symbols" in r]


def stage_cost(model: str, samples: list[int], threads: int) -> list[dict[str, Any]]:
    """What the lossless stages cost a client against one local epoch of ``model``: decoding a
    first-contact 4-bit word stream (the costliest downlink) plus coding a 1-bit upload against
    the received bits (FedBiF's defaults), best of 3 after a warm-up, at ``threads`` threads."""
    import time

    import torch
    from torch import nn

    from benchmarks.common import INPUT_SHAPES
    from compression import entropy, reference
    from core.wire_state import quantized_split
    from fl_app.models import build_model

    torch.set_num_threads(threads)
    channels, size = INPUT_SHAPES[model]
    net = build_model(model, in_channels=channels, num_classes=10, image_size=size)
    count = quantized_split(net)[2].num_quantized
    rng = np.random.default_rng(0)
    words = np.clip(np.round(rng.normal(8, 1.5, count)), 0, 15).astype(np.uint8)
    received = (rng.random(count) < 0.5).astype(np.uint8)
    flipped = received ^ (rng.random(count) < 0.03).astype(np.uint8)
    down = entropy.encode(words, 4)

    def client_stages() -> None:
        entropy.decode(down, 4, count)
        entropy.encode(reference.difference(flipped, received, 1), 1)

    def best(run: Any) -> float:
        run()
        times = []
        for _ in range(3):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return min(times)

    stage = best(client_stages)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    rows = []
    for n in samples:
        images = torch.randn(n, channels, size, size)
        labels = torch.randint(0, 10, (n,))

        def epoch(images: torch.Tensor = images, labels: torch.Tensor = labels) -> None:
            for start in range(0, len(labels), 64):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(
                    net(images[start : start + 64]), labels[start : start + 64]
                )
                loss.backward()
                optimizer.step()

        seconds = best(epoch)
        rows.append(
            {
                "model": model,
                "quantized": count,
                "images": n,
                "threads": threads,
                "stages_seconds": stage,
                "epoch_seconds": seconds,
                "share": stage / seconds,
            }
        )
        print(
            f"{model}: stages {stage:.4f} s, {n}-image epoch {seconds:.2f} s "
            f"({100 * stage / seconds:.2f}%)",
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
    parser.add_argument(
        "--experiment", type=Path, default=None, help="run this grid's points, recorded"
    )
    parser.add_argument(
        "--cost",
        nargs="+",
        default=None,
        metavar="MODEL:IMAGES",
        help="time the client's stages against local epochs, e.g. cnn4-fedbat:600,6000",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.cost:
        rows = []
        for item in args.cost:
            model, _, counts = item.partition(":")
            rows += stage_cost(model, [int(c) for c in counts.split(",")], args.threads)
        if args.json:
            write_json(args.json, {"rows": rows})
        return 0
    if args.experiment is not None:
        rows = measure_experiment(args.experiment)
    else:
        rows = [row for model in args.models for row in measure(model, args.rounds, args.samples)]
    print()
    print(markdown(rows))
    if args.json:
        write_json(args.json, {"rounds": args.rounds, "samples": args.samples, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
