"""Run-config schema, validation and the typed view every component reads.

Flower hands the ServerApp and each ClientApp the run config as a flat ``dict`` of TOML scalars
(``context.run_config``). One table of ``ConfigKey`` entries is the single source of truth for
each key's type, default, allowed values and help text: ``pyproject.toml`` must carry the same
defaults (a test checks it), and ``parse_run_config`` rejects a bad value at start-up with a message
that lists what is allowed, instead of failing rounds later inside a Ray worker.

Method-specific keys are prefixed by the method (``fedbif-bits``) and declared next to the method's
strategy; ``fl_app.methods.all_config_keys`` collects them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Scalar = bool | int | float | str


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type, or out of range."""


@dataclass(frozen=True)
class ConfigKey:
    """One run-config key: its type, default and constraints.

    ``choices`` may be a callable so that a key can list the names of a registry that is filled
    after this module is imported (strategies, models, datasets).
    """

    name: str
    type: type
    default: Scalar
    help: str
    choices: Sequence[Scalar] | Callable[[], Sequence[Scalar]] | None = None
    min: float | None = None
    max: float | None = None
    min_inclusive: bool = True

    def allowed(self) -> Sequence[Scalar] | None:
        """The allowed values, resolving a lazy ``choices``."""
        return self.choices() if callable(self.choices) else self.choices

    def describe_range(self) -> str:
        """Human-readable range, used in error messages and the README."""
        allowed = self.allowed()
        if allowed is not None:
            return "one of " + ", ".join(repr(c) for c in allowed)
        low = "" if self.min is None else ("[" if self.min_inclusive else "(") + f"{self.min:g}"
        high = "" if self.max is None else f"{self.max:g}]"
        if low and high:
            return f"{self.type.__name__} in {low}, {high}"
        if low:
            return f"{self.type.__name__} {'>=' if self.min_inclusive else '>'} {self.min:g}"
        if high:
            return f"{self.type.__name__} <= {self.max:g}"
        return self.type.__name__

    def validate(self, value: Any) -> Scalar:
        """Return ``value`` coerced to this key's type, or raise ``ConfigError`` saying why."""
        expected = f"{self.name} must be {self.describe_range()}, got {value!r}"
        if self.type is bool:
            if not isinstance(value, bool):
                raise ConfigError(expected)
        elif self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(expected)
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(expected)
            value = float(value)
            if not math.isfinite(value):
                raise ConfigError(expected)
        elif self.type is str:
            if not isinstance(value, str):
                raise ConfigError(expected)
        allowed = self.allowed()
        if allowed is not None and value not in allowed:
            raise ConfigError(expected)
        if self.min is not None:
            too_low = value < self.min if self.min_inclusive else value <= self.min
            if too_low:
                raise ConfigError(expected)
        if self.max is not None and value > self.max:
            raise ConfigError(expected)
        return value


def _strategy_names() -> list[str]:
    from fl_app.methods import METHODS

    return METHODS.names()


def _dataset_names() -> list[str]:
    from fl_app.data import DATASETS

    return DATASETS.names()


def _model_names() -> list[str]:
    from fl_app.models import MODELS

    return MODELS.names()


def _partitioner_names() -> list[str]:
    from fl_app.data import PARTITIONERS

    return list(PARTITIONERS)


COMMON_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey("strategy", str, "fedavg", "method to run", choices=_strategy_names),
    ConfigKey("dataset", str, "digits", "dataset name", choices=_dataset_names),
    ConfigKey("model", str, "digits-cnn-bn", "model name", choices=_model_names),
    ConfigKey("partitioner", str, "dirichlet", "how data is split", choices=_partitioner_names),
    ConfigKey(
        "dirichlet-alpha", float, 0.5, "Dirichlet concentration", min=0.0, min_inclusive=False
    ),
    ConfigKey("labels-per-client", int, 2, "classes per client (label-count)", min=1),
    ConfigKey("data-files", str, "", "folder with local train.*/test.* files of a hub dataset"),
    ConfigKey("num-server-rounds", int, 20, "federated rounds", min=1),
    ConfigKey(
        "fraction-fit",
        float,
        1.0,
        "share of clients sampled per round",
        min=0.0,
        max=1.0,
        min_inclusive=False,
    ),
    ConfigKey("min-available-clients", int, 2, "clients to wait for before a round", min=1),
    ConfigKey("local-epochs", int, 2, "local epochs per round", min=1),
    ConfigKey("batch-size", int, 32, "local mini-batch size", min=1),
    ConfigKey(
        "learning-rate", float, 0.05, "client SGD learning rate", min=0.0, min_inclusive=False
    ),
    ConfigKey("momentum", float, 0.9, "client SGD momentum", min=0.0, max=1.0),
    ConfigKey("weight-decay", float, 0.0, "client SGD weight decay", min=0.0),
    ConfigKey("seed", int, 42, "seed for data split, init, sampling and training", min=0),
    ConfigKey(
        "device", str, "auto", "where to train and evaluate", choices=("auto", "cpu", "cuda")
    ),
    ConfigKey("results-dir", str, "results", "folder for results (relative: to the launch dir)"),
    ConfigKey("run-name", str, "", "results sub-folder; empty: derived from the config"),
    ConfigKey(
        "round-timeout", float, 0.0, "seconds to wait for clients per round; 0 = no limit", min=0.0
    ),
    ConfigKey("min-fit-results", int, 1, "fewer valid client updates skip the round", min=1),
    ConfigKey("checkpoint", bool, True, "write checkpoint.npz to the run folder every round"),
    ConfigKey("resume-from", str, "", "a run folder (or its checkpoint.npz) to continue from"),
)


@dataclass(frozen=True)
class RunConfig:
    """Validated run config: typed attributes for the common keys, ``cfg["key"]`` for any key."""

    values: Mapping[str, Scalar]

    def __getitem__(self, key: str) -> Scalar:
        return self.values[key]

    def as_dict(self) -> dict[str, Scalar]:
        return dict(self.values)

    # Typed shortcuts for the keys every component reads.
    @property
    def strategy(self) -> str:
        return str(self.values["strategy"])

    @property
    def dataset(self) -> str:
        return str(self.values["dataset"])

    @property
    def model(self) -> str:
        return str(self.values["model"])

    @property
    def partitioner(self) -> str:
        return str(self.values["partitioner"])

    @property
    def num_rounds(self) -> int:
        return int(self.values["num-server-rounds"])

    @property
    def seed(self) -> int:
        return int(self.values["seed"])

    @property
    def device(self) -> str:
        return str(self.values["device"])

    @property
    def run_name(self) -> str:
        """The results sub-folder: the user's name, or one derived from the config."""
        name = str(self.values["run-name"])
        if name:
            return name
        return f"{self.strategy}-{self.dataset}-{self.model}-{self.partitioner}-seed{self.seed}"

    def run_dir(self, base: Path | None = None) -> Path:
        """Absolute results folder: the ServerApp runs from Flower's app cache, not the project,
        so a relative ``results-dir`` is resolved against ``base`` (default: the working dir)."""
        root = Path(str(self.values["results-dir"])).expanduser()
        if not root.is_absolute():
            root = (base or Path.cwd()) / root
        return root.resolve() / self.run_name


def parse_run_config(raw: Mapping[str, Any], keys: Iterable[ConfigKey]) -> RunConfig:
    """Validate ``raw`` against ``keys``: fill defaults, reject unknown keys and bad values.

    All problems are reported at once so a user fixes a command line in one go.
    """
    by_name = {key.name: key for key in keys}
    errors = [
        f"unknown key {name!r}; valid keys: {', '.join(sorted(by_name))}"
        for name in raw
        if name not in by_name
    ]
    values: dict[str, Scalar] = {}
    for name, key in by_name.items():
        try:
            values[name] = key.validate(raw.get(name, key.default))
        except ConfigError as err:
            errors.append(str(err))
    if errors:
        raise ConfigError("invalid run config:\n  " + "\n  ".join(errors))
    return RunConfig(values)
