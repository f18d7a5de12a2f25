"""Shared server side of the post-training compression baselines (FedPAQ, QSGD, FedDQ, DAdaQuant,
EF-SignSGD): clients train normally and send a compressed update delta = local - received global.

The server decodes each update into a float32 vector over the model's whole wire state (weights,
biases and BatchNorm tensors, concatenated in wire order): that is the update's delta, combined by
the base (example-weighted mean by default, server learning rate 1 as in FedAvg). The downlink
is the fp32 global. A method only supplies ``decode_delta`` (any error there rejects the message).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from strategies.base import ClientReply, ClientUpdate, CommunicationStrategy


class DeltaStrategy(CommunicationStrategy):
    """Base of the update-compression strategies; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sizes = tuple(int(a.size) for a in self.global_state)

    def decode_delta(self, server_round: int, reply: ClientReply) -> np.ndarray:
        """The client's update as float32 (d,); raise ``ValueError`` on a malformed payload."""
        raise NotImplementedError

    def decode_update(self, server_round: int, reply: ClientReply) -> ClientUpdate:
        return self.delta_update(reply, self.decode_delta(server_round, reply))

    def delta_update(self, reply: ClientReply, delta: np.ndarray) -> ClientUpdate:
        """The update of a decoded delta, after checking it covers the model."""
        if delta.shape != (self.num_flat,):
            raise ValueError(f"decoded update is not {self.num_flat} values")
        update = reply.update([])
        update.delta = np.asarray(delta, dtype=np.float32)
        return update
