"""ServerApp: validates the run config, then runs the configured method's strategy."""

from __future__ import annotations

from functools import partial
from logging import INFO
from pathlib import Path

from flwr.common import Context
from flwr.common.logger import log
from flwr.server import ServerApp, ServerAppComponents, ServerConfig

from core.config import ConfigError, RunConfig
from core.results import ResultsWriter
from core.settings import Settings
from fl_app.data import (
    DATASETS,
    load_test_set,
    load_validation_set,
    partition_arguments,
    partition_sizes,
)
from fl_app.methods import METHODS, load_config
from fl_app.models import build_model
from strategies.base import CommunicationStrategy


def build_strategy(cfg: RunConfig, settings: Settings | None = None) -> CommunicationStrategy:
    """The configured method's strategy with the server's test set (and validation split, when
    ``validation-fraction`` > 0) and results writer."""
    method = METHODS.get(cfg.strategy)
    if settings is None:
        settings = method.settings.from_values(cfg.values)
    spec = DATASETS.get(cfg.dataset)
    model_fn = partial(
        build_model,
        cfg.model,
        in_channels=spec.in_channels,
        num_classes=spec.num_classes,
        image_size=spec.image_size,
    )
    model_fn()  # an unsupported model/dataset pair fails here, before any client runs
    test_set = load_test_set(cfg.dataset, data_files=cfg.data_files)
    validation_set = (
        load_validation_set(
            cfg.dataset,
            fraction=cfg.validation_fraction,
            seed=cfg.seed,
            data_files=cfg.data_files,
        )
        if cfg.validation_fraction > 0
        else None
    )
    results = ResultsWriter(cfg.run_dir(), extra_columns=tuple(method.strategy.round_columns))
    log(INFO, "results of this run go to %s", results.run_dir)
    sizes = partial(partition_sizes, cfg.dataset, **partition_arguments(cfg))
    return method.strategy(
        cfg,
        settings,
        model_fn=model_fn,
        test_set=test_set,
        results=results,
        partition_sizes=sizes,
        validation_set=validation_set,
    )


def build_server(
    cfg: RunConfig, settings: Settings | None = None
) -> tuple[CommunicationStrategy, int]:
    """The strategy, restored from ``resume-from`` when set, and the number of rounds still to run.

    A resumed strategy numbers its rounds from the checkpoint's round + 1 (Flower restarts at 1).
    """
    strategy = build_strategy(cfg, settings)
    done = 0
    if resume := cfg.resume_from:
        path = Path(resume).expanduser()
        done = strategy.restore(path if path.is_absolute() else Path.cwd() / path)
    remaining = cfg.num_server_rounds - done
    if remaining < 1:
        raise ConfigError(
            f"resume-from {resume!r} already holds {done} rounds; raise num-server-rounds "
            f"(now {cfg.num_server_rounds}) to continue"
        )
    return strategy, remaining


def server_fn(context: Context) -> ServerAppComponents:
    """Fail fast on a bad config, then hand Flower the strategy and the number of rounds."""
    cfg, settings = load_config(context.run_config)
    strategy, rounds = build_server(cfg, settings)
    # A client that misses the timeout becomes a failure of that round, not a hang.
    # With a link profile round-timeout is a modelled deadline (core.link), not Flower's wait.
    timeout = (cfg.round_timeout or None) if cfg.link_profile == "none" else None
    return ServerAppComponents(
        strategy=strategy, config=ServerConfig(num_rounds=rounds, round_timeout=timeout)
    )


app = ServerApp(server_fn=server_fn)
