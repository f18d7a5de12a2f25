"""The method registry: run-config ``strategy`` name -> (strategy class, client class, keys).

Adding a method is one ``METHODS.add`` line here plus its strategy, client and codec modules;
nothing in the ServerApp/ClientApp wiring names a method.
"""

from __future__ import annotations

from dataclasses import dataclass

from clients import update_compression as upc
from clients.base import TrainingClient
from clients.cuq import ClippedUQClient
from clients.fedbat import FedBATClient
from clients.fedbif import FedBiFClient
from clients.lbi import LBIClient
from fl_app.config import COMMON_KEYS, ConfigKey
from fl_app.registry import Registry
from strategies import dadaquant, quantized_updates, signsgd
from strategies.base import CommunicationStrategy
from strategies.cuq import CONFIG_KEYS as CUQ_KEYS
from strategies.cuq import ClippedUQStrategy
from strategies.fedavg import FedAvgStrategy
from strategies.fedbat import CONFIG_KEYS as FEDBAT_KEYS
from strategies.fedbat import FedBATStrategy
from strategies.fedbif import CONFIG_KEYS as FEDBIF_KEYS
from strategies.fedbif import FedBiFStrategy
from strategies.lbi import CONFIG_KEYS as LBI_KEYS
from strategies.lbi import LBIStrategy


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
METHODS.add("fedbat", Method(FedBATStrategy, FedBATClient, "FedBAT 1-bit updates", FEDBAT_KEYS))
METHODS.add("lbi-fl", Method(LBIStrategy, LBIClient, "LBI-FL low-bit training", LBI_KEYS))
METHODS.add("clipped-uq", Method(ClippedUQStrategy, ClippedUQClient, "clipped uniform Q", CUQ_KEYS))
METHODS.add(
    "signsgd",
    Method(
        signsgd.SignSGDStrategy,
        upc.SignSGDClient,
        "SignSGD majority vote, 1 bit both ways",
        signsgd.CONFIG_KEYS,
    ),
)
METHODS.add(
    "ef-signsgd",
    Method(
        signsgd.EFSignSGDStrategy, upc.EFSignSGDClient, "EF-SignSGD scaled sign + error feedback"
    ),
)
METHODS.add(
    "fedpaq",
    Method(
        quantized_updates.FedPAQStrategy,
        upc.FedPAQClient,
        "FedPAQ b-bit stochastic update",
        quantized_updates.FEDPAQ_KEYS,
    ),
)
METHODS.add(
    "qsgd",
    Method(
        quantized_updates.QSGDStrategy,
        upc.QSGDClient,
        "QSGD s-level norm-scaled update",
        quantized_updates.QSGD_KEYS,
    ),
)
METHODS.add(
    "feddq",
    Method(
        quantized_updates.FedDQStrategy,
        upc.FedDQClient,
        "FedDQ fixed-step descending bits",
        quantized_updates.FEDDQ_KEYS,
    ),
)
METHODS.add(
    "dadaquant",
    Method(
        dadaquant.DAdaQuantStrategy,
        upc.DAdaQuantClient,
        "DAdaQuant doubly-adaptive levels",
        dadaquant.CONFIG_KEYS,
    ),
)


def all_config_keys() -> tuple[ConfigKey, ...]:
    """Common keys plus every method's keys: the full set Flower's run config may hold."""
    keys = list(COMMON_KEYS)
    for name in METHODS.names():
        keys.extend(METHODS.get(name).config_keys)
    return tuple(keys)


def markdown_key_tables() -> str:
    """The README's per-method key tables, generated from the registry (``python -m
    fl_app.methods``) so the documentation lists exactly what the app accepts."""
    sections = []
    for name in METHODS.names():
        method = METHODS.get(name)
        if not method.config_keys:
            continue
        lines = [
            f"`{name}` ({method.description}):",
            "",
            "| key | default | meaning |",
            "|---|---|---|",
        ]
        for key in method.config_keys:
            default = str(key.default).lower() if isinstance(key.default, bool) else key.default
            allowed = key.allowed()
            meaning = key.help + (f" ({', '.join(map(str, allowed))})" if allowed else "")
            lines.append(f"| `{key.name}` | `{default}` | {meaning} |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


if __name__ == "__main__":
    print(markdown_key_tables())
