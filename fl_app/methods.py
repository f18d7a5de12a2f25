"""The method registry: run-config ``strategy`` name -> (strategy class, client class, keys).

Adding a method is one ``METHODS.add`` line here plus its strategy, client and codec modules;
nothing in the ServerApp/ClientApp wiring names a method.
"""

from __future__ import annotations

from dataclasses import dataclass

from clients.base import TrainingClient
from clients.fedbif import FedBiFClient
from fl_app.config import COMMON_KEYS, ConfigKey
from fl_app.registry import Registry
from strategies.base import CommunicationStrategy
from strategies.fedavg import FedAvgStrategy
from strategies.fedbif import CONFIG_KEYS as FEDBIF_KEYS
from strategies.fedbif import FedBiFStrategy


@dataclass(frozen=True)
class Method:
    """Everything the app needs to run one method."""

    strategy: type[CommunicationStrategy]
    client: type[TrainingClient]
    description: str
    config_keys: tuple[ConfigKey, ...] = ()


METHODS: Registry[Method] = Registry("strategy")

METHODS.add("fedavg", Method(FedAvgStrategy, TrainingClient, "FedAvg, fp32 both ways"))
METHODS.add("fedbif", Method(FedBiFStrategy, FedBiFClient, "FedBiF bits freezing", FEDBIF_KEYS))


def all_config_keys() -> tuple[ConfigKey, ...]:
    """Common keys plus every method's keys: the full set Flower's run config may hold."""
    keys = list(COMMON_KEYS)
    for name in METHODS.names():
        keys.extend(METHODS.get(name).config_keys)
    return tuple(keys)
