"""One real round of any method on synthetic data: the building block of the benchmarks.

Runs the method's own strategy and client classes (from the registry) for one round on random
images of the model's input shape, through Flower's client serialization, and returns what was
measured: bytes and bpp per direction, the arrays and the exact bytes Flower would send for each
(``np.save`` output, header included), the fit config, and the client's fit time and state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common import Context, FitIns, Parameters, RecordDict, Scalar, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from torch.utils.data import TensorDataset

from compression import entropy
from fl_app.methods import METHODS, load_config
from fl_app.models import build_model
from tools.inprocess import InProcessClientProxy

INPUT_SHAPES = {
    "digits-cnn": (1, 8),
    "digits-cnn-bn": (1, 8),
    "cnn4": (3, 32),
    "cnn4-fedbat": (1, 28),
    "resnet18": (3, 32),
    "resnet10": (3, 32),
    "vgg11-light": (3, 32),
}


@dataclass
class RoundMeasure:
    """What one round of one client measured; ``*_tensors`` are the serialized payloads."""

    method: str
    model: str
    num_scalars: int
    uplink_bytes: int
    downlink_bytes: int
    uplink_bpp: float
    downlink_bpp: float
    fit_seconds: float
    steps: int
    downlink: list[np.ndarray]
    uplink: list[np.ndarray]
    client_state_bytes: int
    downlink_tensors: list[bytes] = field(default_factory=list)
    uplink_tensors: list[bytes] = field(default_factory=list)
    fit_config: dict[str, Scalar] = field(default_factory=dict)
    fit_cpu_seconds: float = 0.0
    #: every entropy-coded stream of the downlink / uplink (``compression.entropy.recording``).
    downlink_streams: list[entropy.StreamRecord] = field(default_factory=list)
    uplink_streams: list[entropy.StreamRecord] = field(default_factory=list)


@dataclass(frozen=True)
class Timing:
    """Best-of-N seconds of a piece of work on two clocks.

    ``cpu`` is this process's CPU time (all threads): on a box shared with other jobs it stays
    what the work costs while wall time stretches with the neighbours' load, so ratios of CPU
    times compare work with work. ``wall`` is what a user waits on an idle machine at best.
    """

    wall: float
    cpu: float


def best_of(repeats: int, work: Callable[[], object]) -> Timing:
    """Minimum wall and minimum CPU seconds of ``repeats`` calls of ``work``."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        work()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return Timing(min(walls), min(cpus))


def one_round(
    method: str, model_name: str, samples: int = 128, batch: int = 32, **overrides: Any
) -> RoundMeasure:
    """Run round 1 of ``method`` with one client; ``overrides`` are run-config keys."""
    return run_rounds(method, model_name, 1, samples, batch, **overrides)[0]


def run_rounds(
    method: str,
    model_name: str,
    rounds: int,
    samples: int = 128,
    batch: int = 32,
    **overrides: Any,
) -> list[RoundMeasure]:
    """Rounds 1..``rounds`` of ``method`` with one client that keeps its node state (so round 2
    on is coded against what it holds, where reference coding is on); one measure per round."""
    channels, size = INPUT_SHAPES[model_name]
    raw = {
        "strategy": method,
        "model": model_name,
        "device": "cpu",
        "local-epochs": 1,
        "min-available-clients": 1,
        "batch-size": batch,
        "checkpoint": False,
        **overrides,
    }
    cfg, settings = load_config(raw)
    entry = METHODS.get(method)

    def model_fn() -> torch.nn.Module:
        return build_model(model_name, in_channels=channels, num_classes=10, image_size=size)

    strategy = entry.strategy(cfg, settings, model_fn=model_fn, test_set=None, results=None)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(samples, channels, size, size, generator=generator),
        torch.randint(0, 10, (samples,), generator=generator),
    )
    context = Context(
        run_id=0,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 1},
        state=RecordDict(),
        run_config=cfg.as_dict(),
    )

    def client_fn(ctx: Context):
        return entry.client(
            cfg, settings, context=ctx, model=model_fn(), train_set=data, partition_id=0
        ).to_client()

    manager = SimpleClientManager()
    manager.register(InProcessClientProxy("1", context, client_fn))
    measures = []
    for server_round in range(1, rounds + 1):
        with entropy.recording() as downlink_streams:
            ((proxy, ins),) = strategy.configure_fit(server_round, Parameters([], ""), manager)
        started, cpu_started = time.perf_counter(), time.process_time()
        with entropy.recording() as uplink_streams:
            res = proxy.fit(FitIns(ins.parameters, ins.config), timeout=None, group_id=server_round)
        fit_seconds = time.perf_counter() - started
        fit_cpu_seconds = time.process_time() - cpu_started
        strategy.aggregate_fit(server_round, [(proxy, res)], [])
        row = strategy.round_row(server_round, 0.0, 0.0)
        state_bytes = sum(
            record.count_bytes()
            for record in context.state.values()
            if hasattr(record, "count_bytes")
        )
        measures.append(
            RoundMeasure(
                method,
                model_name,
                strategy.num_scalars,
                row["uplink_bytes"],
                row["downlink_bytes"],
                row["uplink_bpp"],
                row["downlink_bpp"],
                fit_seconds,
                -(-samples // batch),
                parameters_to_ndarrays(ins.parameters),
                parameters_to_ndarrays(res.parameters),
                state_bytes,
                list(ins.parameters.tensors),
                list(res.parameters.tensors),
                dict(ins.config),
                fit_cpu_seconds,
                downlink_streams,
                uplink_streams,
            )
        )
    return measures


def write_json(path: Path, payload: Any, indent: int = 2) -> None:
    """A benchmark's results as JSON at ``path`` (its folder made if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=indent) + "\n")
