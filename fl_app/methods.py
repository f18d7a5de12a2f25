"""The method registry: run-config ``strategy`` name -> strategy, client and settings classes.

Adding a method is one ``METHODS.add`` line here plus its contract, strategy, client and codec
modules; nothing else in the ServerApp/ClientApp wiring names a method. This module also
assembles the full run-config schema (``all_config_keys``: the common keys with the registries'
names as their choices, then every method's keys) and the README's key tables.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from clients import update_compression as upc
from clients.base import TrainingClient
from clients.cuq import ClippedUQClient
from clients.fedbat import FedBATClient
from clients.fedbif import FedBiFClient
from clients.lbi import LBIClient
from contracts.cuq import ClippedUQSettings
from contracts.fedbat import FedBATSettings
from contracts.fedbif import FedBiFSettings
from contracts.lbi import LBISettings
from contracts.signsgd import SignSGDSettings
from contracts.update_quantization import (
    DAdaQuantSettings,
    FedDQSettings,
    FedPAQSettings,
    QSGDSettings,
)
from core.config import ConfigKey, RunConfig, parse_run_config, with_choices
from core.registry import Registry
from core.settings import NoSettings, Settings
from fl_app.data import DATASETS, PARTITIONERS
from fl_app.models import MODELS
from strategies.base import CommunicationStrategy
from strategies.cuq import ClippedUQStrategy
from strategies.dadaquant import DAdaQuantStrategy
from strategies.fedavg import FedAvgStrategy
from strategies.fedbat import FedBATStrategy
from strategies.fedbif import FedBiFStrategy
from strategies.lbi import LBIStrategy
from strategies.quantized_updates import FedDQStrategy, FedPAQStrategy, QSGDStrategy
from strategies.signsgd import EFSignSGDStrategy, SignSGDStrategy


@dataclass(frozen=True)
class Method:
    """Everything the app needs to run one method."""

    strategy: type[CommunicationStrategy]
    client: type[TrainingClient]
    settings: type[Settings]
    description: str


METHODS: Registry[Method] = Registry("strategy")
#: ``model`` value that picks the dataset's usual model (``DatasetSpec.default_model``).
AUTO_MODEL = "auto"

METHODS.add("fedavg", Method(FedAvgStrategy, TrainingClient, NoSettings, "FedAvg, fp32 both ways"))
METHODS.add("fedbif", Method(FedBiFStrategy, FedBiFClient, FedBiFSettings, "FedBiF bits freezing"))
METHODS.add("fedbat", Method(FedBATStrategy, FedBATClient, FedBATSettings, "FedBAT 1-bit updates"))
METHODS.add("lbi-fl", Method(LBIStrategy, LBIClient, LBISettings, "LBI-FL low-bit training"))
METHODS.add(
    "clipped-uq",
    Method(ClippedUQStrategy, ClippedUQClient, ClippedUQSettings, "clipped uniform Q"),
)
METHODS.add(
    "signsgd",
    Method(
        SignSGDStrategy,
        upc.SignSGDClient,
        SignSGDSettings,
        "SignSGD majority vote, 1 bit both ways",
    ),
)
METHODS.add(
    "ef-signsgd",
    Method(
        EFSignSGDStrategy,
        upc.EFSignSGDClient,
        NoSettings,
        "EF-SignSGD scaled sign + error feedback",
    ),
)
METHODS.add(
    "fedpaq",
    Method(FedPAQStrategy, upc.FedPAQClient, FedPAQSettings, "FedPAQ b-bit stochastic update"),
)
METHODS.add(
    "qsgd",
    Method(QSGDStrategy, upc.QSGDClient, QSGDSettings, "QSGD s-level norm-scaled update"),
)
METHODS.add(
    "feddq",
    Method(FedDQStrategy, upc.FedDQClient, FedDQSettings, "FedDQ fixed-step descending bits"),
)
METHODS.add(
    "dadaquant",
    Method(
        DAdaQuantStrategy,
        upc.DAdaQuantClient,
        DAdaQuantSettings,
        "DAdaQuant doubly-adaptive levels",
    ),
)


def all_config_keys() -> tuple[ConfigKey, ...]:
    """Common keys plus every method's keys: the full set Flower's run config may hold."""
    keys = with_choices(
        RunConfig.config_keys(),
        {
            "strategy": METHODS.names(),
            "dataset": DATASETS.names(),
            "model": [AUTO_MODEL, *MODELS.names()],
            "partitioner": PARTITIONERS,
        },
    )
    groups: list[type[Settings]] = []
    for name in METHODS.names():
        group = METHODS.get(name).settings
        if group not in groups:
            groups.append(group)
            keys.extend(group.config_keys())
    return tuple(keys)


def load_config(raw: dict) -> tuple[RunConfig, Settings]:
    """Validate a raw run config and build the chosen method's settings, once.

    Every bad value (single keys and cross-key constraints) fails here with ``ConfigError``.
    ``model = "auto"`` becomes the dataset's usual model, and the ``auto`` wire keys what the
    method's codecs support (``CommunicationStrategy.resolve_wire``), so results, checkpoints and
    resumes name what ran.
    """
    cfg = parse_run_config(raw, all_config_keys())
    if cfg.model == AUTO_MODEL:
        model = DATASETS.get(cfg.dataset).default_model
        cfg = dataclasses.replace(cfg, model=model, values={**cfg.values, "model": model})
    method = METHODS.get(cfg.strategy)
    wire = method.strategy.resolve_wire(cfg)
    if wire:  # "auto" wire keys become what they stand for, so results and resumes name them
        fields = {key.replace("-", "_"): value for key, value in wire.items()}
        cfg = dataclasses.replace(cfg, **fields, values={**cfg.values, **wire})
    settings = method.settings.from_values(cfg.values)
    method.strategy.check_downlink(cfg, settings)
    return cfg, settings


def markdown_key_tables() -> str:
    """The README's per-method key tables, generated from the registry (``python -m
    fl_app.methods``) so the documentation lists exactly what the app accepts."""
    sections = []
    for name in METHODS.names():
        method = METHODS.get(name)
        keys = method.settings.config_keys()
        if not keys:
            continue
        lines = [
            f"`{name}` ({method.description}):",
            "",
            "| key | default | meaning |",
            "|---|---|---|",
        ]
        for key in keys:
            default = str(key.default).lower() if isinstance(key.default, bool) else key.default
            allowed = key.choices
            meaning = key.help + (f" ({', '.join(map(str, allowed))})" if allowed else "")
            lines.append(f"| `{key.name}` | `{default}` | {meaning} |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


if __name__ == "__main__":
    print(markdown_key_tables())
