"""Small builders shared by the strategy and client tests."""

from __future__ import annotations

import io

import numpy as np
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy


class StubProxy(ClientProxy):
    """A client proxy that is only ever sampled, never called."""

    def fit(self, ins, timeout, group_id):  # pragma: no cover - never called
        raise NotImplementedError

    evaluate = get_parameters = get_properties = reconnect = fit


def manager_with(num_clients: int) -> SimpleClientManager:
    manager = SimpleClientManager()
    for index in range(num_clients):
        manager.register(StubProxy(str(1000 + index)))
    return manager


def fit_res(
    arrays_or_parameters, num_examples: int = 10, partition_id: int | None = 0, **metrics
) -> FitRes:
    parameters = (
        arrays_or_parameters
        if isinstance(arrays_or_parameters, Parameters)
        else ndarrays_to_parameters(arrays_or_parameters)
    )
    if partition_id is not None:
        metrics["partition-id"] = partition_id
    return FitRes(Status(Code.OK, ""), parameters, num_examples, metrics)


def build_test_strategy(base: dict, tmp_path, **overrides):
    """The configured strategy with ``base`` run config, results under ``tmp_path``."""
    from fl_app.methods import load_config
    from fl_app.server_app import build_strategy

    raw = {**base, "results-dir": str(tmp_path), **overrides}
    return build_strategy(load_config(raw)[0])


def npy_bytes(array: np.ndarray) -> int:
    """Serialized size of ``array`` as Flower sends it (``np.save``, header included)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return len(buffer.getvalue())


def delta_tensors(strategy, update) -> list[np.ndarray]:  # noqa: ANN001
    """A decoded update's delta cut back into the wire state's tensors."""
    from compression.layout import split_flat

    return split_flat(update.delta, [a.shape for a in strategy.global_state])


def delta_part(strategy, update, indices) -> np.ndarray:  # noqa: ANN001
    """The delta's values of the wire tensors at ``indices``, concatenated."""
    pieces = delta_tensors(strategy, update)
    return np.concatenate([pieces[i].reshape(-1) for i in indices])
