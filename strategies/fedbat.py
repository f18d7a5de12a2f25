"""FedBAT (Li et al., ICML 2024): binarization-aware local training, 1 bit per weight uplink.

Downlink is the full-precision global model (as in the paper). Each client learns an additive
update of every Conv2d/Linear weight through a stochastic binarizer with a learnable per-layer step
size (``clients.fedbat``) and sends the update's sign bits plus one alpha per layer, together with
its trained biases/BatchNorm tensors (the extras). The server rebuilds every client's binarized
update exactly, ``alpha_l * (2 b - 1)``, and sets

    w_new = w_global + sum_k n_k / n * update_k,     extras_new = sum_k n_k / n * extras_k

(data-size weighted, accumulated in float64). Wire format: ``compression.fedbat_codec``.
"""

from __future__ import annotations

import numpy as np
from flwr.common import FitRes, parameters_to_ndarrays

from compression.fedbat_codec import EXTRAS_DTYPES, decode_uplink, rebuild_update
from compression.layout import split_flat
from fl_app.config import ConfigKey, RunConfig
from fl_app.torch_utils import quantized_split
from strategies.base import ClientUpdate, CommunicationStrategy, PayloadError

CONFIG_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey(
        "fedbat-rho",
        float,
        6.0,
        "rho: pace of the step size a0*exp(rho*a_e)",
        min=0.0,
        min_inclusive=False,
    ),
    ConfigKey(
        "fedbat-warmup",
        float,
        0.5,
        "phi: share of local steps trained in full precision",
        min=0.0,
        max=1.0,
    ),
    ConfigKey(
        "fedbat-alpha-min",
        float,
        5e-4,
        "lower clamp of the step size",
        min=0.0,
        min_inclusive=False,
    ),
    ConfigKey(
        "fedbat-alpha-max",
        float,
        5e-2,
        "upper clamp of the step size",
        min=0.0,
        min_inclusive=False,
    ),
    ConfigKey(
        "fedbat-lr",
        float,
        0.05,
        "learning rate of the updates and step sizes",
        min=0.0,
        min_inclusive=False,
    ),
    ConfigKey(
        "fedbat-extras-dtype",
        str,
        "float16",
        "dtype of biases/BatchNorm on the uplink",
        choices=EXTRAS_DTYPES,
    ),
)


def check_config(cfg: RunConfig) -> None:
    """Cross-key constraints that single ``ConfigKey`` ranges cannot express."""
    low, high = float(cfg["fedbat-alpha-min"]), float(cfg["fedbat-alpha-max"])
    if low >= high:
        raise ValueError(f"fedbat-alpha-min ({low:g}) must be below fedbat-alpha-max ({high:g})")


class FedBATStrategy(CommunicationStrategy):
    """Server side of FedBAT; see the module docstring."""

    extra_columns = ("mean_alpha",)

    def __init__(self, cfg: RunConfig, **kwargs) -> None:  # noqa: ANN003
        super().__init__(cfg, **kwargs)
        check_config(cfg)
        self.b_index, self.e_index, self.split = quantized_split(self.model)
        self.round_metrics: dict[int, dict[str, float]] = {}

    def decode_uplink(self, server_round: int, cid: str, fit_res: FitRes) -> ClientUpdate:
        try:
            arrays = parameters_to_ndarrays(fit_res.parameters)
            bits, alphas, extras = decode_uplink(arrays, self.split)
            update = rebuild_update(bits, alphas, self.split.quantized_sizes)
        except Exception as err:  # garbage bytes, wrong sizes, dtypes or values
            raise PayloadError(f"FedBAT uplink: {err}") from None
        return ClientUpdate.of(cid, fit_res, [update, extras, alphas])

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        total = sum(u.num_examples for u in updates)
        mean_update = np.zeros(self.split.num_quantized, dtype=np.float64)
        mean_extras = np.zeros(self.split.num_extras, dtype=np.float64)
        for update in updates:
            weight = update.num_examples / total
            mean_update += weight * update.arrays[0]
            mean_extras += weight * update.arrays[1]
        new_state = [array.copy() for array in self.global_state]
        pieces = split_flat(mean_update, self.split.quantized_shapes)
        for index, piece in zip(self.b_index, pieces, strict=True):
            new_state[index] = (self.global_state[index] + piece).astype(np.float32)
        pieces = split_flat(mean_extras, self.split.extra_shapes)
        for index, piece in zip(self.e_index, pieces, strict=True):
            new_state[index] = piece.astype(np.float32)
        alphas = np.concatenate([u.arrays[2] for u in updates])
        self.round_metrics[server_round] = {"mean_alpha": float(alphas.mean())}
        return new_state

    def round_row(self, server_round: int, loss: float, accuracy: float) -> dict:
        row = super().round_row(server_round, loss, accuracy)
        row.update(self.round_metrics.get(server_round, {"mean_alpha": float("nan")}))
        return row
