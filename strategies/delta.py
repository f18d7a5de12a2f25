"""Shared server side of the post-training compression baselines (FedPAQ, QSGD, FedDQ, DAdaQuant,
EF-SignSGD): clients train normally and send a compressed update delta = local - received global.

The server decodes each update into a float32 vector over the model's whole wire state (weights,
biases and BatchNorm tensors, concatenated in wire order), takes the example-weighted mean and adds
it to the global model (server learning rate 1, as in FedAvg). The downlink is the fp32 global.
A method only supplies ``decode_delta``; any error there becomes a ``PayloadError``.
"""

from __future__ import annotations

import numpy as np
from flwr.common import FitRes, parameters_to_ndarrays

from compression.layout import concat_flat, split_flat
from strategies.base import ClientUpdate, CommunicationStrategy, PayloadError, weighted_average


class DeltaStrategy(CommunicationStrategy):
    """Base of the update-compression strategies; see the module docstring."""

    #: name used in payload error messages.
    label = "delta"

    def __init__(self, cfg, **kwargs) -> None:  # noqa: ANN001, ANN003
        super().__init__(cfg, **kwargs)
        self.shapes = tuple(a.shape for a in self.global_state)
        self.sizes = [int(a.size) for a in self.global_state]
        self.num_flat = sum(self.sizes)

    def decode_delta(
        self, server_round: int, cid: str, arrays: list[np.ndarray], fit_res: FitRes
    ) -> np.ndarray:
        """The client's update as float32 (d,); raise ``ValueError`` on a malformed payload."""
        raise NotImplementedError

    def decode_uplink(self, server_round: int, cid: str, fit_res: FitRes) -> ClientUpdate:
        try:
            arrays = parameters_to_ndarrays(fit_res.parameters)
            delta = self.decode_delta(server_round, cid, arrays, fit_res)
        except PayloadError:
            raise
        except Exception as err:  # garbage bytes, wrong sizes, dtypes or values
            raise PayloadError(f"{self.label} uplink: {type(err).__name__}: {err}") from None
        if delta.shape != (self.num_flat,) or not np.all(np.isfinite(delta)):
            raise PayloadError(
                f"{self.label} uplink: decoded update is not {self.num_flat} finite values"
            )
        return ClientUpdate.of(cid, fit_res, [delta])

    def flat_global(self) -> np.ndarray:
        return concat_flat(self.global_state, np.float32)

    def unflatten(self, flat: np.ndarray) -> list[np.ndarray]:
        return [piece.astype(np.float32).copy() for piece in split_flat(flat, self.shapes)]

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        mean_delta = weighted_average(updates)[0]
        return self.unflatten(self.flat_global() + mean_delta)


def expect_arrays(arrays: list[np.ndarray], count: int, label: str) -> None:
    """Fail with the method's name when a payload has the wrong number of arrays."""
    if len(arrays) != count:
        raise ValueError(f"{label} uplink has {count} arrays, got {len(arrays)}")
