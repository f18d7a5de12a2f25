"""Shared server side of the post-training compression baselines (FedPAQ, QSGD, FedDQ, DAdaQuant,
EF-SignSGD): clients train normally and send a compressed update delta = local - received global.

The server decodes each update into a float32 vector over the model's whole wire state (weights,
biases and BatchNorm tensors, concatenated in wire order), takes the example-weighted mean and adds
it to the global model (server learning rate 1, as in FedAvg). The downlink is the fp32 global.
A method only supplies ``decode_delta`` (any error there rejects the message).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compression.layout import concat_flat, split_flat
from strategies.aggregation import weighted_average
from strategies.base import ClientReply, ClientUpdate, CommunicationStrategy


class DeltaStrategy(CommunicationStrategy):
    """Base of the update-compression strategies; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shapes = tuple(a.shape for a in self.global_state)
        self.sizes = tuple(int(a.size) for a in self.global_state)
        self.num_flat = sum(self.sizes)

    def decode_delta(self, server_round: int, reply: ClientReply) -> np.ndarray:
        """The client's update as float32 (d,); raise ``ValueError`` on a malformed payload."""
        raise NotImplementedError

    def decode_update(self, server_round: int, reply: ClientReply) -> ClientUpdate:
        return self.delta_update(reply, self.decode_delta(server_round, reply))

    def delta_update(self, reply: ClientReply, delta: np.ndarray) -> ClientUpdate:
        """The update of a decoded delta, after checking it covers the model with finite values
        (array 0 of the update; a method may append side information after it)."""
        if delta.shape != (self.num_flat,) or not np.all(np.isfinite(delta)):
            raise ValueError(f"decoded update is not {self.num_flat} finite values")
        return reply.update([delta])

    def flat_global(self) -> np.ndarray:
        return concat_flat(self.global_state, np.float32)

    def unflatten(self, flat: np.ndarray) -> list[np.ndarray]:
        return [piece.astype(np.float32).copy() for piece in split_flat(flat, self.shapes)]

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        mean_delta = weighted_average(updates)[0]
        return self.unflatten(self.flat_global() + mean_delta)
