"""ClientApp: builds the configured method's ``NumPyClient`` for the node that got the message.

A SuperNode started with ``state-dir`` in its node config keeps its ``context.state`` in a file
there as well (``core.node_state``): written after every fit, read back when a restarted
SuperNode finds its state empty.

A Ray worker serves many messages: the partition tensors and the model are built once per
process and reused (``fl_app.worker_cache``; ``COMMFL_WORKER_CACHE=0`` turns that off).
"""

from __future__ import annotations

import sys
from logging import INFO, WARNING
from pathlib import Path

from flwr.client import Client, ClientApp, NumPyClient
from flwr.common import Context, NDArrays, Scalar
from flwr.common.logger import log

from clients.attacks import AttackingClient, attacking_partitions
from core.config import ConfigError
from core.node_state import NodeStateError, NodeStateStore
from core.torch_utils import (
    apply_thread_count,
    auto_thread_count,
    available_cpus,
    omp_thread_limit,
    select_device,
)
from fl_app.data import DATASETS, load_partition, partition_arguments
from fl_app.methods import METHODS, load_config
from fl_app.models import build_model
from fl_app.worker_cache import CACHE


def client_fn(context: Context) -> Client:
    """Called for every message. The partition's tensors and a model skeleton come from the
    process's bounded cache (``fl_app.worker_cache``); the message installs the weights."""
    cfg, settings = load_config(context.run_config)
    try:
        partition_id = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ConfigError(
            f"node config lacks {err}; start each SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<n>"'
        ) from None
    store = node_state_store(context, cfg.strategy, partition_id)
    spec = DATASETS.get(cfg.dataset)
    # Every argument of load_partition goes through here, so all of them are in the cache key.
    partition_args = partition_arguments(cfg)
    train_set = CACHE.partition(
        ("partition", cfg.dataset, partition_id, num_partitions, *sorted(partition_args.items())),
        lambda: load_partition(cfg.dataset, partition_id, num_partitions, **partition_args),
    )
    device = select_device(cfg.device)
    apply_thread_count(auto_thread_count(cfg.torch_threads, given_cpus(context)))
    # The method and its settings are in the key: LBI-FL converts its model's layers in place.
    model_key = (
        "model",
        cfg.model,
        spec.in_channels,
        spec.num_classes,
        spec.image_size,
        cfg.strategy,
        repr(settings),
        str(device),
    )
    model, release = CACHE.lease_model(
        model_key,
        lambda: build_model(
            cfg.model,
            in_channels=spec.in_channels,
            num_classes=spec.num_classes,
            image_size=spec.image_size,
        ).to(device),
    )
    client_cls = METHODS.get(cfg.strategy).client
    try:
        client = client_cls(
            cfg,
            settings,
            context=context,
            model=model,
            train_set=train_set,
            partition_id=partition_id,
        )
    except BaseException:
        release()
        raise
    CACHE.bind(client, release)
    served: NumPyClient = client
    if cfg.attack != "none" and partition_id in attacking_partitions(
        cfg.seed, num_partitions, cfg.attack_fraction
    ):
        served = AttackingClient(client, cfg)
    if store is not None:
        served = PersistedStateClient(served, context, store)
    return served.to_client()


def given_cpus(context: Context) -> float | None:
    """The CPUs the run gives this client: its Ray actor's (``client-resources-num-cpus``) in a
    simulation, the node config's ``num-cpus`` where the SuperNode (or the in-process runner)
    sets it, else ``OMP_NUM_THREADS`` where the node's environment sets it, else the machine's
    (a SuperNode of a deployment owns its machine)."""
    ray = sys.modules.get("ray")  # only a Ray worker has imported it
    if ray is not None and ray.is_initialized():
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            return float(cpus)
    value = context.node_config.get("num-cpus")
    if value is not None:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"node config num-cpus must be a number, got {value!r}") from None
    limit = omp_thread_limit()
    return float(min(limit, available_cpus()) if limit else available_cpus())


def node_state_store(context: Context, strategy: str, partition_id: int) -> NodeStateStore | None:
    """The node's state file when its node config names a ``state-dir``; a node whose state is
    empty (first message, or a restarted SuperNode) gets the saved state back. A ``state-dir``
    that cannot be written is a ``ConfigError`` here, before any training whose reply the
    failing save after ``fit`` would lose."""
    directory = context.node_config.get("state-dir")
    if not directory:
        return None
    store = NodeStateStore(Path(str(directory)), int(context.run_id), strategy, partition_id)
    store.check_writable()
    if len(context.state) == 0:
        try:
            saved = store.load()
        except NodeStateError as err:
            log(WARNING, "node state not restored, starting fresh: %s", err)
            saved = None
        if saved is not None:
            for name, record in saved.items():
                context.state[name] = record
            log(INFO, "node state restored from %s (%d records)", store.path, len(saved))
    return store


class PersistedStateClient(NumPyClient):
    """Saves the node's ``context.state`` after every fit (the state a fit changes)."""

    def __init__(self, inner: NumPyClient, context: Context, store: NodeStateStore) -> None:
        self.inner = inner
        self.node_context = context
        self.store = store

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return self.inner.get_parameters(config)

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        reply = self.inner.fit(parameters, config)
        self.store.save(self.node_context.state)
        return reply

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        return self.inner.evaluate(parameters, config)


app = ClientApp(client_fn=client_fn)
