"""FedBAT (Li et al., ICML 2024): binarization-aware local training, 1 bit per weight uplink.

Downlink is the full-precision global model (as in the paper). Each client learns an additive
update of every Conv2d/Linear weight through a stochastic binarizer with a learnable per-layer step
size (``clients.fedbat``) and sends the update's sign bits plus one alpha per layer, together with
its trained biases/BatchNorm tensors (the extras). The server rebuilds every client's binarized
update exactly, ``alpha_l * (2 b - 1)``, and sets

    w_new = w_global + sum_k n_k / n * update_k,     extras_new = sum_k n_k / n * extras_k

(data-size weighted, accumulated in float64). Contract: ``contracts.fedbat``; wire format:
``compression.fedbat_codec``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compression.fedbat_codec import rebuild_update
from compression.layout import concat_flat
from contracts import fedbat
from contracts.fedbat import FedBATSettings
from core.wire_state import quantized_split
from strategies.aggregation import gather_flat, place_flat
from strategies.base import ClientReply, ClientUpdate, CommunicationStrategy


class FedBATStrategy(CommunicationStrategy):
    """Server side of FedBAT; see the module docstring."""

    uplink_name = "FedBAT uplink"
    round_columns = {"mean_alpha": float("nan")}
    settings: FedBATSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.b_index, self.e_index, self.split = quantized_split(self.model)
        self.up = fedbat.uplink_codec(self.settings, self.model)

    def decode_update(self, server_round: int, reply: ClientReply) -> ClientUpdate:
        """The rebuilt binarized update of the weights and the client's extras as one delta."""
        message = self.up.decode(reply.arrays)
        update = rebuild_update(message.bits, message.alphas, self.split.quantized_sizes)
        state = [np.zeros_like(array) for array in self.global_state]
        place_flat(state, self.b_index, update, self.split.quantized_shapes)
        # Extras travel as values: their delta is against what the client started from.
        extras = message.extras - gather_flat(
            self.delta_base(server_round), self.e_index, "float32"
        )
        place_flat(state, self.e_index, extras, self.split.extra_shapes)
        result = reply.update([message.alphas])
        result.delta = concat_flat(state, np.float32)
        return result

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        alphas = np.concatenate([u.arrays[0] for u in updates])
        self.record_metrics(server_round, mean_alpha=float(alphas.mean()))
        return super().aggregate(server_round, updates)
