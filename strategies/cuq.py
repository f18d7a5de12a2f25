"""Clipped uniform quantization (arXiv 2405.13365): B-bit uplink with MSE-optimal clips.

Each client trains, then quantizes every Conv2d/Linear weight to B bits on [-s, s] with the
clip s that minimises the squared quantization error (``compression.clipping``), stochastic or
nearest rounding, and sends the packed codes, the clips and each tensor's squared error (SQE).

The server dequantizes and aggregates each quantized tensor either by FedAvg (example-weighted)
or, as the paper proposes, by inverse SQE: client k's copy of layer l gets weight
(1 / e_kl) / sum_j (1 / e_jl), which needs no dataset sizes. Biases and BatchNorm tensors are not
quantized (float16 by default, counted in the measured bpp) and are always averaged by examples:
they carry no quantization error to weight by, and copying one client's (as the authors' code
does) would throw the others' statistics away.

With ``cuq-downlink-bits`` B' > 0 the global model goes down quantized the same way (rounding as
``cuq-rounding`` says, seeded per round; one message shared by all clients of a round), and the
server evaluates that dequantized model, i.e. exactly what the clients start from.

Wire format: ``compression.cuq_codec``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.common import FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy

from compression.clipped_quant import inverse_error_weights
from compression.clipping import GRANULARITIES, ROUNDINGS
from compression.cuq_codec import (
    EXTRAS_DTYPES,
    CuqLayout,
    decode,
    dequantize_layers,
    encode,
    quantize_layers,
)
from compression.layout import concat_flat
from fl_app.config import ConfigKey, RunConfig
from fl_app.torch_utils import quantized_split
from strategies.base import ClientUpdate, CommunicationStrategy, PayloadError, place_flat

AGGREGATIONS = ("inverse-sqe", "fedavg")

CONFIG_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey("cuq-bits", int, 4, "B: bits per quantized weight (uplink)", choices=(2, 3, 4, 8)),
    ConfigKey("cuq-rounding", str, "stochastic", "rounding onto the grid", choices=ROUNDINGS),
    ConfigKey(
        "cuq-granularity", str, "layer", "one clip per layer or per channel", choices=GRANULARITIES
    ),
    ConfigKey("cuq-qat", bool, False, "quantization-aware local training (STE)"),
    ConfigKey(
        "cuq-aggregation", str, "inverse-sqe", "per-layer client weights", choices=AGGREGATIONS
    ),
    ConfigKey(
        "cuq-downlink-bits",
        int,
        0,
        "bits of the quantized downlink (0 = fp32)",
        choices=(0, 2, 3, 4, 8),
    ),
    ConfigKey(
        "cuq-extras-dtype",
        str,
        "float16",
        "dtype of biases/BatchNorm on the wire",
        choices=EXTRAS_DTYPES,
    ),
)

#: salt of the server's downlink rounding seed (clients use their own derived seeds).
DOWNLINK_SALT = 0xC0D


def uplink_layout(cfg: RunConfig, model: torch.nn.Module) -> CuqLayout:
    """Layout of the client -> server messages of this run."""
    _, _, split = quantized_split(model)
    return CuqLayout(split, int(cfg["cuq-bits"]), str(cfg["cuq-granularity"]))


def downlink_layout(cfg: RunConfig, model: torch.nn.Module) -> CuqLayout | None:
    """Layout of the quantized downlink, or ``None`` when the downlink is fp32."""
    bits = int(cfg["cuq-downlink-bits"])
    if bits == 0:
        return None
    _, _, split = quantized_split(model)
    return CuqLayout(split, bits, str(cfg["cuq-granularity"]))


class ClippedUQStrategy(CommunicationStrategy):
    """Server side of clipped uniform quantization; see the module docstring."""

    extra_columns = ("quant_mse", "weight_spread")

    def __init__(self, cfg: RunConfig, **kwargs) -> None:  # noqa: ANN003
        super().__init__(cfg, **kwargs)
        self.q_index, self.e_index, self.split = quantized_split(self.model)
        self.up = uplink_layout(cfg, self.model)
        self.down = downlink_layout(cfg, self.model)
        self.extras_dtype = str(cfg["cuq-extras-dtype"])
        self._next_round = 1
        self._downlink_round: int | None = None
        self._downlink: list[np.ndarray] = []
        self._received: list[np.ndarray] = []
        self.round_metrics: dict[int, dict[str, float]] = {}

    # --------------------------------------------------------------- downlink
    def _prepare_downlink(self, server_round: int) -> None:
        """Quantize the global model once per round (all clients get the same message)."""
        if self.down is None or self._downlink_round == server_round:
            return
        stochastic = self.cfg["cuq-rounding"] == "stochastic"
        generator = torch.Generator().manual_seed(
            self.cfg.seed * 1_000_003 + server_round * 7 + DOWNLINK_SALT
        )
        weights = [self.global_state[i] for i in self.q_index]
        codes, clips, _, restored = quantize_layers(
            weights, self.down, "stochastic" if stochastic else "deterministic", generator
        )
        extras = concat_flat([self.global_state[i] for i in self.e_index], self.extras_dtype)
        self._downlink = encode(self.down, codes, clips, extras)
        received = [array.copy() for array in self.global_state]
        for index, tensor in zip(self.q_index, restored, strict=True):
            received[index] = tensor
        place_flat(received, self.e_index, extras, self.split.extra_shapes)
        self._received = received
        self._downlink_round = server_round

    def downlink_arrays(self, server_round: int, cid: str) -> list[np.ndarray]:
        if self.down is None:
            return self.global_state
        self._prepare_downlink(server_round)
        return self._downlink

    def evaluation_state(self) -> list[np.ndarray]:
        """The model clients will start the next round from (quantized if the downlink is)."""
        if self.down is None:
            return self.global_state
        self._prepare_downlink(self._next_round)
        return self._received

    # --------------------------------------------------------------- uplink and aggregation
    def decode_uplink(self, server_round: int, cid: str, fit_res: FitRes) -> ClientUpdate:
        try:
            message = decode(parameters_to_ndarrays(fit_res.parameters), self.up, with_errors=True)
            weights = dequantize_layers(message, self.up)
        except Exception as err:  # garbage bytes, wrong sizes, dtypes or values
            raise PayloadError(f"clipped-uq uplink: {err}") from None
        assert message.errors is not None
        return ClientUpdate.of(
            cid, fit_res, [*weights, message.extras, message.errors.astype(np.float64)]
        )

    def layer_weights(self, updates: list[ClientUpdate]) -> np.ndarray:
        """(clients, layers) aggregation weights of the quantized tensors; columns sum to 1."""
        layers = self.up.num_layers
        if self.cfg["cuq-aggregation"] == "inverse-sqe":
            return inverse_error_weights(np.stack([u.arrays[-1] for u in updates]))
        examples = np.array([u.num_examples for u in updates], dtype=np.float64)
        return np.repeat((examples / examples.sum())[:, None], layers, axis=1)

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        layers = self.up.num_layers
        weights = self.layer_weights(updates)
        examples = np.array([u.num_examples for u in updates], dtype=np.float64)
        examples /= examples.sum()
        new_state = [array.copy() for array in self.global_state]
        for layer, index in enumerate(self.q_index):
            mean = np.zeros(new_state[index].shape, dtype=np.float64)
            for k, update in enumerate(updates):
                mean += weights[k, layer] * update.arrays[layer]
            new_state[index] = mean.astype(np.float32)
        extras = np.zeros(self.split.num_extras, dtype=np.float64)
        for share, update in zip(examples, updates, strict=True):
            extras += share * update.arrays[layers]
        place_flat(new_state, self.e_index, extras, self.split.extra_shapes)
        errors = np.stack([u.arrays[-1] for u in updates])
        self.round_metrics[server_round] = {
            "quant_mse": float(errors.sum(1).mean() / max(self.split.num_quantized, 1)),
            # 1 = one client dominates every layer, 1/K = uniform: how far from FedAvg we are.
            "weight_spread": float(weights.max(0).mean()),
        }
        return new_state

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # Evaluation after this round shows the model of the next downlink, even if no update
        # arrived (then it is the unchanged global, quantized afresh).
        # (Flower's round number; the base adds the offset of a resumed run.)
        self._next_round = server_round + self.round_offset + 1
        return super().aggregate_fit(server_round, results, failures)

    def method_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """A resumed run must evaluate (and send) the downlink of the round after the saved one."""
        return {}, {"next_round": self._next_round}

    def load_method_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self._next_round = int(meta.get("next_round", 1))
        self._downlink_round = None

    def round_row(self, server_round: int, loss: float, accuracy: float) -> dict:
        row = super().round_row(server_round, loss, accuracy)
        row.update(
            self.round_metrics.get(
                server_round, {"quant_mse": float("nan"), "weight_spread": float("nan")}
            )
        )
        return row
