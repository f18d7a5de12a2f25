"""FedAvg (McMahan et al., 2017): fp32 both ways, example-weighted mean. The reference point every
compressed method's accuracy and bpp is compared against (32 bpp plus serialization headers)."""

from __future__ import annotations

import numpy as np
from flwr.common import FitRes

from strategies.base import (
    ClientUpdate,
    CommunicationStrategy,
    decode_float_arrays,
    weighted_average,
)


class FedAvgStrategy(CommunicationStrategy):
    """Full-precision federated averaging on the common base."""

    def decode_uplink(self, server_round: int, cid: str, fit_res: FitRes) -> ClientUpdate:
        arrays = decode_float_arrays(fit_res, self.global_state)
        return ClientUpdate.of(cid, fit_res, arrays)

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        return weighted_average(updates)
