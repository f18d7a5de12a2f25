"""Run-config schema: defaults, validation messages, and agreement with pyproject.toml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from core.config import ConfigError, parse_run_config
from fl_app.methods import METHODS, all_config_keys

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def parse(**overrides):
    return parse_run_config(
        {k.replace("_", "-"): v for k, v in overrides.items()}, all_config_keys()
    )


def test_pyproject_defaults_match_the_schema_exactly():
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    schema = {key.name: key.default for key in all_config_keys()}
    assert declared == schema


def test_every_default_is_valid():
    cfg = parse()
    assert cfg.strategy == "fedbif" and cfg.dataset == "digits" and cfg.model == "auto"
    assert cfg.num_server_rounds == 20 and cfg.device == "auto"


def test_required_keys_exist():
    names = {key.name for key in all_config_keys()}
    required = {
        "strategy",
        "dataset",
        "model",
        "partitioner",
        "dirichlet-alpha",
        "labels-per-client",
        "num-server-rounds",
        "fraction-fit",
        "local-epochs",
        "batch-size",
        "learning-rate",
        "momentum",
        "weight-decay",
        "seed",
        "device",
        "results-dir",
        "run-name",
    }
    assert required <= names


@pytest.mark.parametrize(
    ("key", "value", "listed"),
    [
        (
            "dataset",
            "emnist",
            "'cifar10', 'cifar100', 'digits', 'fmnist', 'mnist', 'svhn', 'tiny-imagenet'",
        ),
        ("model", "resnet152", "'resnet18'"),
        ("partitioner", "shards", "'iid', 'dirichlet', 'label-count'"),
        ("device", "gpu", "'auto', 'cpu', 'cuda'"),
    ],
)
def test_bad_choice_lists_valid_choices(key, value, listed):
    with pytest.raises(ConfigError) as err:
        parse_run_config({key: value}, all_config_keys())
    message = str(err.value)
    assert key in message and repr(value) in message and listed in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num-server-rounds", 0),
        ("num-server-rounds", 2.5),
        ("num-server-rounds", "3"),
        ("fraction-fit", 0.0),
        ("fraction-fit", 1.5),
        ("learning-rate", -0.1),
        ("dirichlet-alpha", 0),
        ("momentum", True),
        ("batch-size", True),
        ("learning-rate", float("nan")),
    ],
)
def test_bad_numbers_are_rejected(key, value):
    with pytest.raises(ConfigError, match=key):
        parse_run_config({key: value}, all_config_keys())


def test_int_is_accepted_for_float_keys():
    cfg = parse(learning_rate=1, fraction_fit=1)
    assert cfg["learning-rate"] == 1.0 and isinstance(cfg["learning-rate"], float)


def test_unknown_key_and_several_errors_reported_together():
    with pytest.raises(ConfigError) as err:
        parse_run_config({"lr": 0.1, "seed": -1, "device": "tpu"}, all_config_keys())
    message = str(err.value)
    assert "unknown key 'lr'" in message and "seed" in message and "device" in message


def test_run_dir_is_absolute_and_named_from_config(tmp_path, monkeypatch):
    from fl_app.methods import load_config

    monkeypatch.chdir(tmp_path)
    cfg, _ = load_config({"results-dir": "out", "seed": 7})
    folder = cfg.run_dir()
    assert folder.parent == tmp_path / "out"
    assert re.fullmatch(r"fedbif-digits-digits-cnn-bn-dirichlet-seed7-[0-9a-f]{8}", folder.name)
    assert parse(results_dir="out", run_name="mine").run_dir() == tmp_path / "out" / "mine"


def test_default_run_names_differ_with_any_setting_but_where_results_go():
    """A 2-round run must not land in the folder of a 20-round run of the same method."""
    from fl_app.methods import load_config

    def name(**raw):
        return load_config(raw)[0].results_name

    base = name(**{"num-server-rounds": 20})
    assert name(**{"num-server-rounds": 2}) != base
    assert name(**{"num-server-rounds": 20, "entropy": "none"}) != base
    assert name(**{"num-server-rounds": 20, "entropy": "ans"}) == base  # what auto resolves to
    assert name(**{"num-server-rounds": 20, "results-dir": "/elsewhere"}) == base
    assert name(**{"num-server-rounds": 20, "overwrite": True}) == base


def test_bad_strategy_lists_every_method():
    with pytest.raises(ConfigError) as err:
        parse_run_config({"strategy": "fedavgg"}, all_config_keys())
    assert all(repr(name) in str(err.value) for name in METHODS.names())
    assert "'fedavg'" in str(err.value) and "'fedbif'" in str(err.value)


def test_strategy_names_are_lower_case_hyphenated():
    for name in METHODS.names():
        assert name == name.lower() and "_" not in name and " " not in name


def test_readme_documents_every_key_and_strategy():
    readme = (PYPROJECT.parent / "README.md").read_text()
    missing = [key.name for key in all_config_keys() if f"`{key.name}`" not in readme]
    missing += [name for name in METHODS.names() if f"`{name}`" not in readme]
    assert not missing, f"README lacks {missing}"


def test_settings_groups_name_their_keys_from_their_fields():
    from contracts.fedbif import FedBiFSettings

    keys = {key.name: key for key in FedBiFSettings.config_keys()}
    assert keys["fedbif-active-bits"].type is int and keys["fedbif-active-bits"].default == 1
    assert keys["fedbif-vbi"].type is bool and keys["fedbif-lr"].type is float
    assert keys["fedbif-selector"].choices == ("sequential", "fixed", "random")
    cfg = parse(strategy="fedbif", **{"fedbif-active-bits": 2, "fedbif-lr": 0.5})
    settings = FedBiFSettings.from_values(cfg.values)
    assert settings.active_bits == 2 and settings.lr == 0.5 and settings.bits == 4


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"strategy": "fedbat", "fedbat-alpha-min": 0.1, "fedbat-alpha-max": 0.01}, "alpha-min"),
        ({"strategy": "fedbif", "fedbif-active-bits": 3}, "divisible"),
        ({"strategy": "fedbif", "fedbif-selector": "fixed", "fedbif-fixed-bit": 6}, "fixed-bit"),
    ],
)
def test_cross_key_constraints_fail_when_the_config_is_loaded(raw, message):
    from fl_app.methods import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(raw)


@pytest.mark.parametrize(
    ("dataset", "model"),
    [("digits", "digits-cnn-bn"), ("fmnist", "cnn4-fedbat"), ("cifar10", "resnet10")],
)
def test_auto_model_is_the_datasets_usual_model(dataset, model):
    from fl_app.methods import load_config

    cfg, _ = load_config({"dataset": dataset})
    assert cfg.model == model and cfg["model"] == model
    assert cfg.results_name.startswith(f"fedbif-{dataset}-{model}-dirichlet-seed42-")
    assert load_config({"dataset": dataset, "model": "lenet5"})[0].model == "lenet5"
