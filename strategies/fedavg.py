"""FedAvg (McMahan et al., 2017): fp32 both ways, example-weighted mean. The reference point every
compressed method's accuracy and bpp is compared against (32 bpp plus serialization headers)."""

from __future__ import annotations

from typing import Any

import numpy as np

from compression.float_codec import FloatStateCodec
from strategies.aggregation import weighted_average
from strategies.base import ClientReply, ClientUpdate, CommunicationStrategy


class FedAvgStrategy(CommunicationStrategy):
    """Full-precision federated averaging on the common base."""

    uplink_name = "FedAvg uplink"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.codec = FloatStateCodec([a.shape for a in self.global_state])

    def decode_update(self, server_round: int, reply: ClientReply) -> ClientUpdate:
        return reply.update(self.codec.decode(reply.arrays))

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        return weighted_average(updates)
