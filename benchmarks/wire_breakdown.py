"""Wire efficiency per method and direction, with a byte breakdown of the actual payloads.

For each model and method, one real round (``benchmarks.common.one_round``: the method's own
strategy and client, Flower's serialization) gives the exact bytes of every ``np.save``'d array
of the downlink and the uplink. Each array is classified by what it carries, from the method's
wire format (``compression/*_codec.py``, ``compression/update_quantizers.py``,
``compression/sign_codec.py``):

* codes: packed integer codes or signs (uint8), or the fp32 Conv/Linear weights of a plain model;
* scales: per-tensor/bucket steps, clips, norms, alphas, FedDQ's widths (side information);
* BatchNorm / biases: the float extras arrays (split by the model's layout: BatchNorm affine
  parameters and running statistics vs the biases of Conv/Linear layers), at their real dtype;
* headers: serialized bytes minus array bytes (the ``.npy`` header of each array).

bpp = 8 x bytes / scalars of a FedAvg message (the app's definition, ``strategies.base``);
nominal = the method's code width per scalar (32 for an fp32 model, m = 4 / s = 1 for FedBiF,
1 for FedBAT and the sign methods, the widths actually sent for FedDQ/DAdaQuant/QSGD and
LBI-FL).

    python -m benchmarks.wire_breakdown [--models digits-cnn cnn4 resnet18] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from torch import nn

from benchmarks.common import INPUT_SHAPES, RoundMeasure, one_round
from compression.update_quantizers import qsgd_bits, symmetric_bits
from contracts.cuq import ClippedUQSettings
from contracts.fedbif import ACTIVE_MASK, FedBiFSettings, mask_to_positions
from contracts.update_quantization import DADAQUANT_LEVELS, FedPAQSettings, QSGDSettings
from core.wire_state import conv_linear_weight_keys, parameter_split, quantized_split, wire_keys
from fl_app.models import build_model

# What each array of a message carries, per method: (downlink roles, uplink roles). "state" is a
# plain fp32 wire state (one array per wire tensor); "extras" the float extras of
# ``quantized_split`` (biases + BatchNorm); "buffers" those of ``parameter_split`` (BatchNorm
# running statistics only, for the sign methods, whose signs cover every trainable parameter).
STATE = ("state",)
ROLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fedavg": (STATE, STATE),
    "fedbif": (("codes", "scales", "extras"), ("codes", "extras")),
    "fedbat": (STATE, ("codes", "scales", "extras")),
    "clipped-uq": (STATE, ("codes", "scales", "extras")),
    "signsgd": (STATE, ("codes", "buffers")),  # round 1: every client gets the full model
    "ef-signsgd": (STATE, ("codes", "scales", "buffers")),
    "fedpaq": (STATE, ("codes", "scales")),
    "qsgd": (STATE, ("codes", "codes", "scales")),
    "feddq": (STATE, ("codes", "scales", "scales")),
    "dadaquant": (STATE, ("codes", "scales")),
    "lbi-fl": (("codes", "scales", "extras"), ("codes", "scales", "extras")),
}
COMPONENTS = ("codes", "scales", "batchnorm", "biases", "headers")


@dataclass
class Breakdown:
    """Bytes of one message by component; ``total`` is what the strategy counts."""

    model: str
    method: str
    direction: str
    scalars: int
    total: int
    codes: int
    scales: int
    batchnorm: int
    biases: int
    headers: int
    nominal_bpp: float

    @property
    def bpp(self) -> float:
        return 8.0 * self.total / self.scalars

    @property
    def excess(self) -> float:
        return self.bpp / self.nominal_bpp - 1.0


class ModelLayout:
    """Which wire tensors are BatchNorm ones, in the orders the codecs concatenate them."""

    def __init__(self, model: nn.Module) -> None:
        batchnorm_modules = [
            name
            for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self.keys = wire_keys(model)
        self.sizes = [int(v.numel()) for k, v in model.state_dict().items() if k in self.keys]
        self.weights = set(conv_linear_weight_keys(model))
        self.is_bn = [any(k.startswith(f"{m}.") for m in batchnorm_modules) for k in self.keys]
        _, self.extra_index, _ = quantized_split(model)
        _, self.buffer_index, _ = parameter_split(model)

    def float_split(self, indices: list[int]) -> tuple[int, int]:
        """(BatchNorm scalars, other scalars) among the wire tensors ``indices``."""
        bn = sum(self.sizes[i] for i in indices if self.is_bn[i])
        return bn, sum(self.sizes[i] for i in indices) - bn


def classify(
    layout: ModelLayout, roles: tuple[str, ...], arrays: list[np.ndarray], tensors: list[bytes]
) -> dict[str, int]:
    """Bytes per component of one message; checks every array against the role it must play."""
    if len(arrays) != len(tensors):
        raise ValueError("arrays and serialized tensors differ in number")
    parts = dict.fromkeys(COMPONENTS, 0)
    parts["headers"] = sum(len(t) - a.nbytes for a, t in zip(arrays, tensors, strict=True))
    if roles == STATE:
        if len(arrays) != len(layout.keys):
            raise ValueError(f"expected a {len(layout.keys)}-array wire state, got {len(arrays)}")
        for key, is_bn, array in zip(layout.keys, layout.is_bn, arrays, strict=True):
            kind = "codes" if key in layout.weights else "batchnorm" if is_bn else "biases"
            parts[kind] += array.nbytes
        return parts
    if len(roles) != len(arrays):
        raise ValueError(f"expected {len(roles)} arrays ({roles}), got {len(arrays)}")
    for role, array in zip(roles, arrays, strict=True):
        if role == "codes":
            if array.dtype != np.uint8:
                raise ValueError(f"codes must be uint8, got {array.dtype}")
            parts["codes"] += array.nbytes
        elif role == "scales":
            parts["scales"] += array.nbytes
        else:  # float extras: split their bytes by the layout's BatchNorm/bias scalar counts
            indices = layout.extra_index if role == "extras" else layout.buffer_index
            bn, other = layout.float_split(indices)
            if array.size != bn + other:
                raise ValueError(f"{role}: expected {bn + other} scalars, got {array.size}")
            parts["batchnorm"] += bn * array.itemsize
            parts["biases"] += other * array.itemsize
    return parts


def nominal_bpp(measure: RoundMeasure, direction: str, roles: tuple[str, ...]) -> float:
    """Bits per FedAvg scalar the method's codes are meant to cost (no side information)."""
    # one_round runs every method at its defaults: the settings groups' own defaults.
    if roles == STATE:
        return 32.0
    if measure.method == "fedbif":
        if direction == "down":
            return float(FedBiFSettings().bits)
        mask = int(measure.fit_config[ACTIVE_MASK])
        return float(len(mask_to_positions(mask, FedBiFSettings().bits)))
    if measure.method == "lbi-fl":  # the weight width the message itself declares
        message = measure.downlink if direction == "down" else measure.uplink
        return float(message[1][0])
    if measure.method == "clipped-uq":
        return float(ClippedUQSettings().bits)
    if measure.method == "fedpaq":
        return float(FedPAQSettings().bits)
    if measure.method == "qsgd":
        return 1.0 + qsgd_bits(QSGDSettings().levels)  # sign bit + magnitude bits
    if measure.method == "dadaquant":
        return float(symmetric_bits(int(measure.fit_config[DADAQUANT_LEVELS])))
    if measure.method == "feddq":  # the widths the client chose, read from its payload
        widths = measure.uplink[2].astype(np.int64)
        sizes = ModelLayout(_model(measure.model)).sizes
        return float(np.dot(widths, sizes)) / measure.num_scalars
    return 1.0  # fedbat, signsgd, ef-signsgd: one bit per scalar


def _model(name: str) -> nn.Module:
    channels, size = INPUT_SHAPES[name]
    return build_model(name, in_channels=channels, num_classes=10, image_size=size)


def measure_model(model_name: str, methods: list[str], samples: int) -> list[Breakdown]:
    """Every method's compressed directions on one model, plus the fp32 state once."""
    layout = ModelLayout(_model(model_name))
    rows: list[Breakdown] = []
    for method in methods:
        measure = one_round(method, model_name, samples=samples)
        down_roles, up_roles = ROLES[method]
        messages = [
            (
                "down",
                down_roles,
                measure.downlink,
                measure.downlink_tensors,
                measure.downlink_bytes,
            ),
            ("up", up_roles, measure.uplink, measure.uplink_tensors, measure.uplink_bytes),
        ]
        for direction, roles, arrays, tensors, total in messages:
            if roles == STATE and (method != "fedavg" or direction == "up"):
                continue  # the same fp32 message as FedAvg's downlink: reported once per model
            parts = classify(layout, roles, arrays, tensors)
            if sum(parts.values()) != total:
                raise ValueError(f"{method} {direction}: components do not add up to {total} B")
            rows.append(
                Breakdown(
                    model_name,
                    "fp32 model (FedAvg; all fp32 messages)" if roles == STATE else method,
                    direction if roles != STATE else "both",
                    measure.num_scalars,
                    total,
                    **parts,
                    nominal_bpp=nominal_bpp(measure, direction, roles),
                )
            )
    return rows


def print_table(rows: list[Breakdown]) -> None:
    print(
        "| model | method | dir | bpp | nominal | vs nominal | codes B | scales B | BatchNorm B "
        "| biases B | headers B |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.model} | {r.method} | {r.direction} | {r.bpp:.3f} | {r.nominal_bpp:.3g} | "
            f"{r.excess:+.2%} | {r.codes:,} | {r.scales:,} | {r.batchnorm:,} | {r.biases:,} | "
            f"{r.headers:,} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits-cnn", "cnn4", "resnet18"])
    parser.add_argument("--methods", nargs="+", default=list(ROLES), choices=list(ROLES))
    parser.add_argument("--samples", type=int, default=32, help="synthetic images (1 batch)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = [r for model in args.models for r in measure_model(model, args.methods, args.samples)]
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = [{**asdict(r), "bpp": r.bpp, "vs_nominal": r.excess} for r in rows]
        args.json.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
