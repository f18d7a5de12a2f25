"""Typed settings: one frozen dataclass per group of run-config keys, built once per run.

Flower hands the ServerApp and each ClientApp the run config as a flat ``dict`` of TOML
scalars. Each group of keys (the common ones, and each method's) is declared once, as the
fields of a ``Settings`` dataclass: the field's annotation is the key's type, ``setting(...)``
gives its default, help text and allowed values, and the key's name is the field's name with
``-`` for ``_`` behind the group's ``prefix`` (``FedBiFSettings.active_bits`` is
``fedbif-active-bits``). ``config_keys()`` derives the ``ConfigKey`` table that validation, the
README tables and the pyproject check use; ``from_values`` builds the instance from a validated
config, and a group's ``__post_init__`` adds the constraints that span several keys. So code
reads ``settings.bits`` instead of indexing the raw config by key name and casting, and a
default is written in one place (plus ``pyproject.toml``, which Flower requires; a test keeps
the two equal).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

Scalar = bool | int | float | str

_SPEC = "commfl-setting"


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type, or out of range."""


@dataclass(frozen=True)
class ConfigKey:
    """One run-config key: its type, default and constraints."""

    name: str
    type: type
    default: Scalar
    help: str
    choices: Sequence[Scalar] | None = None
    min: float | None = None
    max: float | None = None
    min_inclusive: bool = True

    def describe_range(self) -> str:
        """Human-readable range, used in error messages and the README."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)

        def number(value: float) -> str:
            return str(int(value)) if self.type is int else f"{value:g}"

        low = "" if self.min is None else ("[" if self.min_inclusive else "(") + number(self.min)
        high = "" if self.max is None else f"{number(self.max)}]"
        if low and high:
            return f"{self.type.__name__} in {low}, {high}"
        if low:
            return f"{self.type.__name__} {'>=' if self.min_inclusive else '>'} {number(self.min)}"
        if high:
            return f"{self.type.__name__} <= {number(self.max)}"
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
        if self.choices is not None and value not in self.choices:
            raise ConfigError(expected)
        if self.min is not None:
            too_low = value < self.min if self.min_inclusive else value <= self.min
            if too_low:
                raise ConfigError(expected)
        if self.max is not None and value > self.max:
            raise ConfigError(expected)
        return value


@dataclass(frozen=True)
class _Spec:
    help: str
    choices: Sequence[Scalar] | None
    min: float | None
    max: float | None
    min_inclusive: bool


def setting(
    default: Scalar,
    help: str,
    *,
    choices: Sequence[Scalar] | None = None,
    min: float | None = None,
    max: float | None = None,
    min_inclusive: bool = True,
) -> Any:
    """A ``Settings`` field that is a run-config key (see the module docstring)."""
    spec = _Spec(help, tuple(choices) if choices is not None else None, min, max, min_inclusive)
    return dataclasses.field(default=default, metadata={_SPEC: spec})


@dataclass(frozen=True)
class Settings:
    """Base of the typed settings groups; a subclass declares its keys as ``setting`` fields."""

    #: the keys' name prefix ("fedbif" -> ``fedbif-<field>``); empty for the common keys.
    prefix: ClassVar[str] = ""
    #: the method keys whose default departs from the method's paper, at the paper's value
    #: (``experiments/paper-*.toml`` set them; README "Fidelity to the papers" says why).
    paper_literal: ClassVar[dict[str, Scalar]] = {}

    @classmethod
    def key_name(cls, field_name: str) -> str:
        """Run-config key of a field: ``active_bits`` -> ``fedbif-active-bits``."""
        name = field_name.replace("_", "-")
        return f"{cls.prefix}-{name}" if cls.prefix else name

    @classmethod
    def _setting_fields(cls) -> list[tuple[dataclasses.Field, _Spec]]:
        return [(f, f.metadata[_SPEC]) for f in dataclasses.fields(cls) if _SPEC in f.metadata]

    @classmethod
    def config_keys(cls) -> tuple[ConfigKey, ...]:
        """The ``ConfigKey`` of every field, in declaration order."""
        hints = typing.get_type_hints(cls)
        return tuple(
            ConfigKey(
                cls.key_name(f.name),
                hints[f.name],
                f.default,
                spec.help,
                choices=spec.choices,
                min=spec.min,
                max=spec.max,
                min_inclusive=spec.min_inclusive,
            )
            for f, spec in cls._setting_fields()
        )

    @classmethod
    def from_values(cls, config: Mapping[str, Scalar], **extra: Any) -> Self:
        """The group's settings from a validated run config (``parse_values``' result).

        Cross-key constraints in ``__post_init__`` raise ``ConfigError`` here, at start-up.
        """
        kwargs = {f.name: config[cls.key_name(f.name)] for f, _ in cls._setting_fields()}
        return cls(**kwargs, **extra)


@dataclass(frozen=True)
class NoSettings(Settings):
    """The settings of a method without keys of its own (FedAvg, EF-SignSGD)."""


def did_you_mean(word: str, candidates: Sequence[Scalar]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate names, or an empty string."""
    names = [c for c in candidates if isinstance(c, str)]
    close = difflib.get_close_matches(word, names, n=2, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def parse_values(raw: Mapping[str, Any], keys: Sequence[ConfigKey]) -> dict[str, Scalar]:
    """Validate ``raw`` against ``keys``: fill defaults, reject unknown keys and bad values.

    All problems are reported at once, on one line, so a user fixes a command line in one go;
    an unknown key or choice names its closest valid ones.
    """
    by_name = {key.name: key for key in keys}
    errors = [
        f"unknown key {name!r}{did_you_mean(name, list(by_name))}; the README's run-config "
        "tables list every key"
        for name in raw
        if name not in by_name
    ]
    values: dict[str, Scalar] = {}
    for name, key in by_name.items():
        value = raw.get(name, key.default)
        try:
            values[name] = key.validate(value)
        except ConfigError as err:
            hint = (
                did_you_mean(value, key.choices) if key.choices and isinstance(value, str) else ""
            )
            errors.append(f"{err}{hint}")
    if errors:
        raise ConfigError("invalid run config: " + "; ".join(errors))
    return values


#: one ``key=value`` of a command line; a value is quoted text or runs to the next blank.
_PAIR = re.compile(r"""([^\s=]+)=('[^']*'|"[^"]*"|\S+)""")
#: a value a shell user means as text although it is not quoted (``strategy=fedbat``).
_BARE_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.+-]*")


def parse_overrides(text: str) -> dict[str, Scalar]:
    """``key=value`` pairs of a command line (``flwr run --run-config`` syntax: TOML values)
    as a dict; an unquoted word is taken as text, so ``strategy=fedbat`` means
    ``strategy='fedbat'``. Anything else that is not a value fails with one line."""
    values: dict[str, Scalar] = {}
    position = 0
    for match in _PAIR.finditer(text):
        stray = text[position : match.start()].strip()
        if stray:
            raise ConfigError(f"run config: expected key=value, got {stray!r}")
        position = match.end()
        key, literal = match.groups()
        try:
            value = tomllib.loads(f"v = {literal}")["v"]
        except tomllib.TOMLDecodeError:
            if not _BARE_WORD.fullmatch(literal):
                raise ConfigError(
                    f"run config: {key}={literal} is not a value (a number, true/false, or "
                    f"text in quotes: {key}='{literal}')"
                ) from None
            value = literal
        if not isinstance(value, bool | int | float | str):
            raise ConfigError(f"run config: {key} must be a single value, got {literal}")
        values[key] = value
    stray = text[position:].strip()
    if stray:
        raise ConfigError(f"run config: expected key=value, got {stray!r}")
    return values
