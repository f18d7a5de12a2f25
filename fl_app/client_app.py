"""ClientApp: builds the configured method's ``NumPyClient`` for the node that got the message."""

from __future__ import annotations

from flwr.client import Client, ClientApp
from flwr.common import Context

from core.config import ConfigError
from fl_app.data import DATASETS, load_partition
from fl_app.methods import METHODS, load_config
from fl_app.models import build_model


def client_fn(context: Context) -> Client:
    """Called for every message; ``fl_app.data`` caches data loading per process."""
    cfg, settings = load_config(context.run_config)
    try:
        partition_id = int(context.node_config["partition-id"])
        num_partitions = int(context.node_config["num-partitions"])
    except KeyError as err:
        raise ConfigError(
            f"node config lacks {err}; start each SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<n>"'
        ) from None
    spec = DATASETS.get(cfg.dataset)
    train_set = load_partition(
        cfg.dataset,
        partition_id,
        num_partitions,
        partitioner=cfg.partitioner,
        alpha=cfg.dirichlet_alpha,
        labels_per_client=cfg.labels_per_client,
        seed=cfg.seed,
        data_files=cfg.data_files,
        min_partition_size=cfg.dirichlet_min_size,
        self_balancing=cfg.dirichlet_self_balancing,
    )
    model = build_model(
        cfg.model,
        in_channels=spec.in_channels,
        num_classes=spec.num_classes,
        image_size=spec.image_size,
    )
    client_cls = METHODS.get(cfg.strategy).client
    client = client_cls(
        cfg, settings, context=context, model=model, train_set=train_set, partition_id=partition_id
    )
    return client.to_client()


app = ClientApp(client_fn=client_fn)
