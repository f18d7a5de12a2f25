"""Drive a strategy and its clients in one process, without Ray or a SuperLink.

The same ``client_fn``, strategy and Flower serialization (``NumPyClient`` -> ``Client`` ->
``FitRes``) as a real run, minus the transport: tests of whole runs (accuracy reached, bytes
counted, failures survived) and benchmarks finish in seconds instead of paying Ray's start-up.
``flwr run`` remains the way to run the app; ``tests/test_e2e_flwr_run.py`` covers that path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flwr.client import Client
from flwr.common import (
    Code,
    Context,
    DisconnectRes,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    ReconnectIns,
    RecordDict,
)
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from fl_app.client_app import client_fn as default_client_fn
from fl_app.methods import load_config
from fl_app.server_app import build_server
from strategies.base import CommunicationStrategy

ClientFn = Callable[[Context], Client]


class InProcessClientProxy(ClientProxy):
    """A ClientProxy that builds the client from its node ``Context`` for every message,
    as Flower does, so per-client state lives only in ``context.state``."""

    def __init__(self, cid: str, context: Context, client_fn: ClientFn) -> None:
        super().__init__(cid)
        self.context = context
        self.client_fn = client_fn

    def fit(self, ins: FitIns, timeout: float | None, group_id: int | None) -> FitRes:
        return self.client_fn(self.context).fit(ins)

    def evaluate(
        self, ins: EvaluateIns, timeout: float | None, group_id: int | None
    ) -> EvaluateRes:
        return self.client_fn(self.context).evaluate(ins)

    def get_parameters(
        self, ins: GetParametersIns, timeout: float | None, group_id: int | None
    ) -> GetParametersRes:
        return self.client_fn(self.context).get_parameters(ins)

    def get_properties(
        self, ins: GetPropertiesIns, timeout: float | None, group_id: int | None
    ) -> GetPropertiesRes:
        return self.client_fn(self.context).get_properties(ins)

    def reconnect(
        self, ins: ReconnectIns, timeout: float | None, group_id: int | None
    ) -> DisconnectRes:
        return DisconnectRes(reason="in-process")


def make_contexts(run_config: Mapping[str, Any], num_clients: int) -> list[Context]:
    """One node ``Context`` per client, as a simulation would give them."""
    return [
        Context(
            run_id=0,
            node_id=index + 1,
            # Clients train one at a time here, but the process shares the machine with
            # whatever else runs: one thread each (core.torch_utils.auto_thread_count says why).
            node_config={"partition-id": index, "num-partitions": num_clients, "num-cpus": 1},
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for index in range(num_clients)
    ]


def run_inprocess(
    run_config: Mapping[str, Any],
    num_clients: int,
    *,
    client_fn: ClientFn = default_client_fn,
    contexts: list[Context] | None = None,
) -> CommunicationStrategy:
    """Run ``num-server-rounds`` rounds (those left after ``resume-from``); returns the strategy
    (history, traffic, global model). A client that raises is a failure of that round, as in Flower.
    """
    cfg, settings = load_config(dict(run_config))
    strategy, rounds = build_server(cfg, settings)
    contexts = contexts or make_contexts(cfg.as_dict(), num_clients)
    manager = SimpleClientManager()
    for context in contexts:
        manager.register(InProcessClientProxy(str(context.node_id), context, client_fn))
    parameters = strategy.initialize_parameters(manager)
    assert parameters is not None
    strategy.evaluate(0, parameters)
    for server_round in range(1, rounds + 1):  # Flower's numbering; the strategy adds its offset
        instructions = strategy.configure_fit(server_round, parameters, manager)
        results: list[tuple[ClientProxy, FitRes]] = []
        failures: list[tuple[ClientProxy, FitRes] | BaseException] = []
        for proxy, ins in instructions:
            try:
                res = proxy.fit(ins, timeout=None, group_id=server_round)
            except Exception as err:  # a crashing client must not end the run
                failures.append(err)
                continue
            if res.status.code == Code.OK:
                results.append((proxy, res))
            else:
                failures.append((proxy, res))
        new_parameters, _ = strategy.aggregate_fit(server_round, results, failures)
        parameters = new_parameters or parameters
        strategy.evaluate(server_round, parameters)
    return strategy
