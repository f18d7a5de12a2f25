"""FedAvg (McMahan et al., 2017): fp32 both ways, example-weighted mean. The reference point every
compressed method's accuracy and bpp is compared against (32 bpp plus serialization headers)."""

from __future__ import annotations

from typing import Any

from compression.float_codec import FloatStateCodec
from strategies.base import ClientReply, ClientUpdate, CommunicationStrategy


class FedAvgStrategy(CommunicationStrategy):
    """Full-precision federated averaging on the common base (its delta: client - global)."""

    uplink_name = "FedAvg uplink"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.codec = FloatStateCodec([a.shape for a in self.global_state])

    def decode_update(self, server_round: int, reply: ClientReply) -> ClientUpdate:
        update = reply.update([])
        update.delta = self.delta_of(self.codec.decode(reply.arrays))
        return update
