"""FedBiF wire efficiency: measured bytes of one round's downlink and uplink, with a breakdown.

Runs the real strategy and client code for one round on synthetic data of the model's input shape
(no dataset download needed) and reports measured bpp against the nominal m (down) and s (up),
plus the client's VBI state size (what 1,000 clients would hold).

    python benchmarks/fedbif_wire.py [--models digits-cnn-bn cnn4 resnet18]
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from flwr.common import Context, FitIns, Parameters, RecordDict, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from torch.utils.data import TensorDataset

from clients.fedbif import STATE_KEY, FedBiFClient
from fl_app.config import parse_run_config
from fl_app.inprocess import InProcessClientProxy
from fl_app.methods import all_config_keys
from fl_app.models import build_model
from strategies.fedbif import FedBiFStrategy

SHAPES = {
    "digits-cnn": (1, 8),
    "digits-cnn-bn": (1, 8),
    "cnn4": (3, 32),
    "resnet18": (3, 32),
    "resnet10": (3, 32),
    "vgg11-light": (3, 32),
}


def npy_header(array: np.ndarray) -> int:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return len(buffer.getvalue()) - array.nbytes


def breakdown(arrays: list[np.ndarray], names: list[str]) -> str:
    parts = [f"{name} {a.nbytes:,} B" for name, a in zip(names, arrays, strict=True)]
    headers = sum(npy_header(a) for a in arrays)
    return ", ".join(parts) + f", headers {headers} B"


def measure(model_name: str, samples: int = 64) -> dict[str, float]:
    channels, size = SHAPES[model_name]
    raw = {
        "strategy": "fedbif",
        "model": model_name,
        "device": "cpu",
        "local-epochs": 1,
        "min-available-clients": 1,
        "batch-size": 32,
    }
    cfg = parse_run_config(raw, all_config_keys())

    def model_fn() -> torch.nn.Module:
        return build_model(
            model_name,
            in_channels=channels,
            num_classes=10,
            image_size=size,
        )

    strategy = FedBiFStrategy(cfg, model_fn=model_fn, test_set=None, results=None)
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
        return FedBiFClient(
            cfg, context=ctx, model=model_fn(), train_set=data, partition_id=0
        ).to_client()

    manager = SimpleClientManager()
    manager.register(InProcessClientProxy("1", context, client_fn))
    ((proxy, ins),) = strategy.configure_fit(1, Parameters([], ""), manager)
    started = time.perf_counter()
    res = proxy.fit(FitIns(ins.parameters, ins.config), timeout=None, group_id=1)
    fit_seconds = time.perf_counter() - started
    strategy.aggregate_fit(1, [(proxy, res)], [])
    row = strategy.round_row(1, 0.0, 0.0)
    down = parameters_to_ndarrays(ins.parameters)
    up = parameters_to_ndarrays(res.parameters)
    state_bytes = context.state[STATE_KEY].count_bytes()
    print(
        f"\n{model_name}: {strategy.num_scalars:,} scalars "
        f"({strategy.split.num_quantized:,} quantized, {strategy.split.num_extras:,} extras)"
    )
    print(
        f"  down {row['downlink_bytes']:,} B = {row['downlink_bpp']:.4f} bpp "
        f"(nominal {strategy.layout.bits}, +{row['downlink_bpp'] / strategy.layout.bits - 1:.2%})"
        f": {breakdown(down, ['codes', 'steps', 'extras'])}"
    )
    print(
        f"  up   {row['uplink_bytes']:,} B = {row['uplink_bpp']:.4f} bpp "
        f"(nominal {strategy.active}, +{row['uplink_bpp'] / strategy.active - 1:.2%})"
        f": {breakdown(up, ['codes', 'extras'])}"
    )
    print(
        f"  VBI state per client: {state_bytes:,} B; "
        f"1,000 clients: {state_bytes * 1e3 / 2**30:.2f} GiB; "
        f"one local epoch on {samples} samples: {fit_seconds:.2f} s"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits-cnn-bn", "cnn4", "resnet18"])
    args = parser.parse_args()
    for name in args.models:
        measure(name)


if __name__ == "__main__":
    main()
