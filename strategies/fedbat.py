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
from compression.layout import split_flat
from contracts import fedbat
from contracts.fedbat import FedBATSettings
from core.wire_state import quantized_split
from strategies.aggregation import example_shares, place_flat, weighted_sum
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
        message = self.up.decode(reply.arrays)
        update = rebuild_update(message.bits, message.alphas, self.split.quantized_sizes)
        return reply.update([update, message.extras, message.alphas])

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        shares = example_shares(updates)
        mean_update = weighted_sum(shares, (u.arrays[0] for u in updates))
        mean_extras = weighted_sum(shares, (u.arrays[1] for u in updates))
        new_state = [array.copy() for array in self.global_state]
        pieces = split_flat(mean_update, self.split.quantized_shapes)
        for index, piece in zip(self.b_index, pieces, strict=True):
            new_state[index] = (self.global_state[index] + piece).astype(np.float32)
        place_flat(new_state, self.e_index, mean_extras, self.split.extra_shapes)
        alphas = np.concatenate([u.arrays[2] for u in updates])
        self.record_metrics(server_round, mean_alpha=float(alphas.mean()))
        return new_state
