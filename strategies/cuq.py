"""Clipped uniform quantization (arXiv 2405.13365): B-bit uplink with MSE-optimal clips.

Each client trains, then quantizes every Conv2d/Linear weight to B bits on [-s, s] with the
clip s that minimises the exact squared error of the quantizer (``compression.clipping``;
``cuq-clip=octav`` is the authors' iteration), stochastic or nearest rounding, and sends the
packed codes, the clips and each tensor's squared error (SQE).

The server dequantizes and aggregates each quantized tensor either by FedAvg (example-weighted)
or, as the paper proposes, by inverse SQE: client k's copy of layer l gets weight
(1 / e_kl) / sum_j (1 / e_jl), which needs no dataset sizes. Biases and BatchNorm tensors are not
quantized (float16 by default, counted in the measured bpp) and are always averaged by examples:
they carry no quantization error to weight by, and copying one client's (as the authors' code
does) would throw the others' statistics away.

With ``cuq-downlink-bits`` B' > 0 the global model goes down quantized the same way (rounding as
``cuq-rounding`` says, seeded per round; one message shared by all clients of a round), and the
server evaluates that dequantized model, i.e. exactly what the clients start from.

Contract: ``contracts.cuq``; wire format: ``compression.cuq_codec``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compression.clipped_quant import inverse_error_weights
from compression.cuq_codec import CuqMessage, dequantize_layers, quantize_layers
from contracts import cuq
from contracts.cuq import ClippedUQSettings
from contracts.downlink import Downlink
from core.config import RunConfig
from core.seeding import torch_generator
from core.settings import ConfigError, Settings
from core.wire_state import quantized_split
from strategies.aggregation import example_shares, gather_flat, lower_median, place_flat
from strategies.base import ClientReply, ClientUpdate, CommunicationStrategy

#: salt of the server's downlink rounding seed (clients use their own derived seeds).
DOWNLINK_SALT = 0xC0D


def capped_weights(weights: np.ndarray, cap: float) -> np.ndarray:
    """(clients, layers) weights with each above ``cap`` x its layer's lower median weight
    lowered to it, columns renormalised to 1; ``cap`` 0: unchanged."""
    if cap <= 0:
        return weights
    bounded = np.minimum(weights, cap * lower_median(weights)[None, :])
    return bounded / bounded.sum(axis=0, keepdims=True)


class ClippedUQStrategy(CommunicationStrategy):
    """Server side of clipped uniform quantization; see the module docstring."""

    uplink_name = "clipped-uq uplink"
    entropy_codes = True
    round_columns = {"quant_mse": float("nan"), "weight_spread": float("nan")}
    settings: ClippedUQSettings

    @classmethod
    def check_downlink(cls, cfg: RunConfig, settings: Settings) -> None:
        """Its own quantized downlink (``cuq-downlink-bits``) or the generic one, not both."""
        super().check_downlink(cfg, settings)
        own_bits = getattr(settings, "downlink_bits", 0)
        if own_bits and Downlink.from_config(cfg).active:
            raise ConfigError(
                f"cuq-downlink-bits={own_bits} and downlink={cfg.downlink!r} both compress the "
                f"downlink; set cuq-downlink-bits=0 or downlink='method'"
            )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.q_index, self.e_index, self.split = quantized_split(self.model)
        self.up = cuq.uplink_codec(self.settings, self.model, self.cfg.entropy)
        self.down = cuq.downlink_codec(self.settings, self.model, self.cfg.entropy)

    # --------------------------------------------------------------- downlink
    def downlink_message(self, server_round: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(wire arrays, the wire state clients decode from them) of the round's quantized
        downlink; computed once per round (all clients get the same message)."""
        return self.round_memo.get(server_round, "downlink", lambda: self._quantize(server_round))

    def _quantize(self, server_round: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        assert self.down is not None
        generator = torch_generator(self.cfg.seed, server_round, DOWNLINK_SALT)
        weights = [self.global_state[i] for i in self.q_index]
        codes, clips, _, restored = quantize_layers(
            weights, self.down.layout, self.settings.rounding, generator, self.settings.clip
        )
        extras = gather_flat(self.global_state, self.e_index, self.settings.extras_dtype)
        arrays = self.down.encode(CuqMessage(codes, clips, None, extras))
        received = [array.copy() for array in self.global_state]
        for index, tensor in zip(self.q_index, restored, strict=True):
            received[index] = tensor
        place_flat(received, self.e_index, extras, self.split.extra_shapes)
        return arrays, received

    def downlink_arrays(self, server_round: int, cid: str) -> list[np.ndarray]:
        if self.down is None:  # fp32, or the generic ``downlink`` codec
            return super().downlink_arrays(server_round, cid)
        return self.downlink_message(server_round)[0]

    def evaluation_state(self, server_round: int) -> list[np.ndarray]:
        """The model clients start the next round from (quantized if the downlink is)."""
        if self.down is None:
            return self.global_state
        return self.downlink_message(server_round + 1)[1]

    # --------------------------------------------------------------- uplink and aggregation
    def decode_update(self, server_round: int, reply: ClientReply) -> ClientUpdate:
        """The dequantized weights and the extras as a delta; the SQEs kept for weighting."""
        message = self.up.decode(reply.arrays)
        weights = dequantize_layers(message, self.up.layout)
        state = [array.copy() for array in self.global_state]
        for index, tensor in zip(self.q_index, weights, strict=True):
            state[index] = tensor
        place_flat(state, self.e_index, message.extras, self.split.extra_shapes)
        assert message.errors is not None
        update = reply.update([message.errors.astype(np.float64)])
        update.delta = self.delta_of(state)
        return update

    def layer_weights(self, updates: list[ClientUpdate]) -> np.ndarray:
        """(clients, layers) aggregation weights of the quantized tensors; columns sum to 1.

        Inverse SQE (the paper's weights), each capped at ``cuq-weight-cap`` times the layer's
        lower median weight: a client that reports (or truly has) no error gets at most that
        many times the weight of the round's middle client, and with two clients the honest
        one sets the bound (``capped_weights``).
        """
        if self.settings.aggregation == "inverse-sqe":
            errors = np.stack([u.arrays[0] for u in updates])
            return capped_weights(inverse_error_weights(errors), self.settings.weight_cap)
        shares = np.asarray(example_shares(updates))
        return np.repeat(shares[:, None], self.up.layout.num_layers, axis=1)

    def client_weights(self, updates: list[ClientUpdate]) -> np.ndarray:
        """Per wire tensor: the layer weights for quantized tensors, example shares for the
        extras (they carry no quantization error to weight by)."""
        layers = self.layer_weights(updates)
        shares = np.asarray(example_shares(updates))
        columns = [shares] * len(self.global_state)
        for layer, index in enumerate(self.q_index):
            columns[index] = layers[:, layer]
        return np.stack(columns, axis=1)

    def segment_sizes(self) -> list[int]:
        return [int(a.size) for a in self.global_state]

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        errors = np.stack([u.arrays[0] for u in updates])
        weights = self.layer_weights(updates)
        self.record_metrics(
            server_round,
            quant_mse=float(errors.sum(1).mean() / max(self.split.num_quantized, 1)),
            # 1 = one client dominates every layer, 1/K = uniform: how far from FedAvg we are.
            weight_spread=float(weights.max(0).mean()),
        )
        return super().aggregate(server_round, updates)
