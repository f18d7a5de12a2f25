"""Every numeric run-config key has a range enforced at start: a property test over the schema.

Beyond each bound (and NaN, infinity) a value fails when the config loads, with one line naming
the key. At each bound it loads, and where the bound costs no more than a tiny run, two rounds of
the method the key belongs to run without a crash (their model may be poor: a learning rate of 100
is allowed, and the aggregate check keeps such a model finite).
"""

from __future__ import annotations

import math

import pytest

from core.config import ConfigError
from fl_app.methods import METHODS, all_config_keys, load_config
from tools.inprocess import run_inprocess

NUMERIC = [k for k in all_config_keys() if k.type in (int, float) and k.choices is None]
#: the strategy whose run reads a method key (common keys: FedAvg).
OWNER = {
    key.name: name for name in METHODS.names() for key in METHODS.get(name).settings.config_keys()
}
#: keys whose bound values are valid but cost minutes or more to run (or wait) at: their bounds
#: are checked at load time only.
COSTLY = {
    "num-server-rounds",
    "local-epochs",
    "min-available-clients",
    "min-fit-results",
    "round-timeout",
    "attack-stall-seconds",
    "dirichlet-min-size",
    "labels-per-client",
    "lbi-start",
    "lbi-interval",
    "lbi-scale-interval",
    "batch-size",
    "seed",
    "torch-threads",
    "server-torch-threads",
}


def beyond(key) -> list:
    values: list = [math.nan, math.inf] if key.type is float else []
    step = 1 if key.type is int else max(abs(key.max or 1.0), 1.0) * 1e-6
    if key.min is not None:
        values.append(key.min - step if key.min_inclusive else key.min)
    if key.max is not None:
        values.append(key.max + step)
    return values


def at_bounds(key) -> list:
    values = []
    if key.min is not None:
        low = key.min if key.min_inclusive else key.min + (1 if key.type is int else 1e-6)
        values.append(key.type(low))
    if key.max is not None:
        values.append(key.type(key.max))
    return values


def test_every_numeric_key_has_both_bounds():
    assert all(k.min is not None and k.max is not None for k in NUMERIC), [
        k.name for k in NUMERIC if k.min is None or k.max is None
    ]


@pytest.mark.parametrize("key", NUMERIC, ids=lambda k: k.name)
def test_values_beyond_a_bound_fail_at_start_in_one_line(key):
    strategy = OWNER.get(key.name, "fedavg")
    for value in beyond(key):
        with pytest.raises(ConfigError) as err:
            load_config({"strategy": strategy, key.name: value})
        message = str(err.value)
        assert key.name in message and "\n" not in message, message


@pytest.mark.parametrize("key", [k for k in NUMERIC if k.name not in COSTLY], ids=lambda k: k.name)
def test_values_at_a_bound_run_two_rounds(tmp_path, key):
    strategy = OWNER.get(key.name, "fedavg")
    for value in at_bounds(key):
        config = {
            "strategy": strategy,
            "device": "cpu",
            "num-server-rounds": 2,
            "local-epochs": 1,
            "client-data-fraction": 0.1,
            "checkpoint": False,
            "torch-threads": 1,
            "results-dir": str(tmp_path / f"{value}"),
            key.name: value,
        }
        try:
            load_config(config)
        except ConfigError as err:  # a constraint across keys: still one line at start
            assert "\n" not in str(err)
            continue
        run = run_inprocess(config, num_clients=2)
        assert run.summary()["rounds_completed"] == 2, (key.name, value)
