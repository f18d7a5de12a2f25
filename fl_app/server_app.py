"""ServerApp: validates the run config, then runs the configured method's strategy."""

from __future__ import annotations

from functools import partial
from logging import INFO
from pathlib import Path

from flwr.common import Context
from flwr.common.logger import log
from flwr.server import ServerApp, ServerAppComponents, ServerConfig

from fl_app.config import ConfigError, RunConfig, parse_run_config
from fl_app.data import DATASETS, load_test_set
from fl_app.methods import METHODS, all_config_keys
from fl_app.models import build_model
from fl_app.results import ResultsWriter
from strategies.base import CommunicationStrategy


def build_strategy(cfg: RunConfig) -> CommunicationStrategy:
    """The configured method's strategy with the server's test set and results writer."""
    method = METHODS.get(cfg.strategy)
    spec = DATASETS.get(cfg.dataset)
    model_fn = partial(
        build_model,
        cfg.model,
        in_channels=spec.in_channels,
        num_classes=spec.num_classes,
        image_size=spec.image_size,
    )
    model_fn()  # an unsupported model/dataset pair fails here, before any client runs
    test_set = load_test_set(cfg.dataset, data_files=str(cfg["data-files"]))
    results = ResultsWriter(cfg.run_dir(), extra_columns=method.strategy.extra_columns)
    log(INFO, "results of this run go to %s", results.run_dir)
    return method.strategy(cfg, model_fn=model_fn, test_set=test_set, results=results)


def build_server(cfg: RunConfig) -> tuple[CommunicationStrategy, int]:
    """The strategy, restored from ``resume-from`` when set, and the number of rounds still to run.

    A resumed strategy numbers its rounds from the checkpoint's round + 1 (Flower restarts at 1).
    """
    strategy = build_strategy(cfg)
    done = 0
    if resume := str(cfg["resume-from"]):
        path = Path(resume).expanduser()
        done = strategy.restore(path if path.is_absolute() else Path.cwd() / path)
    remaining = cfg.num_rounds - done
    if remaining < 1:
        raise ConfigError(
            f"resume-from {resume!r} already holds {done} rounds; raise num-server-rounds "
            f"(now {cfg.num_rounds}) to continue"
        )
    return strategy, remaining


def server_fn(context: Context) -> ServerAppComponents:
    """Fail fast on a bad config, then hand Flower the strategy and the number of rounds."""
    cfg = parse_run_config(context.run_config, all_config_keys())
    strategy, rounds = build_server(cfg)
    # A client that misses the timeout becomes a failure of that round, not a hang.
    timeout = float(cfg["round-timeout"]) or None
    return ServerAppComponents(
        strategy=strategy, config=ServerConfig(num_rounds=rounds, round_timeout=timeout)
    )


app = ServerApp(server_fn=server_fn)
