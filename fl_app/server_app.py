"""ServerApp: validates the run config, then runs the configured method's strategy."""

from __future__ import annotations

from functools import partial
from logging import ERROR, INFO
from pathlib import Path

from flwr.common import Context
from flwr.common.logger import log
from flwr.server import ServerApp, ServerAppComponents, ServerConfig

from core.config import LEGACY_VALUES, ConfigError, RunConfig
from core.results import ResultsWriter
from core.run_identity import check_results_folder
from core.settings import Settings
from fl_app.data import (
    DATASETS,
    load_test_set,
    load_validation_set,
    partition_arguments,
    partition_sizes,
)
from fl_app.methods import METHODS, all_config_keys, load_config
from fl_app.models import build_model
from strategies.base import CommunicationStrategy
from strategies.checkpointing import check_resume_config


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
    try:
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
    except ValueError as err:  # the files a user pointed at: one line, naming them
        where = f"data-files={cfg.data_files!r}" if cfg.data_files else f"dataset={cfg.dataset!r}"
        raise ConfigError(f"{where}: {err}") from None
    check_start(cfg)
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


def check_start(cfg: RunConfig) -> None:
    """Refuse, with one line (``ConfigError``), a run that would clobber another run's results
    or change the run it resumes; nothing is written before these pass."""
    defaults = {**{key.name: key.default for key in all_config_keys()}, **LEGACY_VALUES}
    run_dir = cfg.run_dir()
    check_results_folder(
        run_dir, cfg.as_dict(), defaults=defaults, resuming_here=resumes_into(cfg, run_dir)
    )
    path = resume_path(cfg)
    if path is not None:
        try:
            check_resume_config(path, cfg, defaults)
        except (OSError, ValueError, KeyError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"resume-from {path}: cannot read its checkpoint: {err}") from None


def resume_path(cfg: RunConfig) -> Path | None:
    """``resume-from`` as an absolute path (relative: to the working directory), or None."""
    if not cfg.resume_from:
        return None
    path = Path(cfg.resume_from).expanduser()
    return path if path.is_absolute() else Path.cwd() / path


def resumes_into(cfg: RunConfig, run_dir: Path) -> bool:
    """Whether the run resumes from the checkpoint in its own results folder."""
    path = resume_path(cfg)
    if path is None:
        return False
    folder = path if path.is_dir() or path.suffix != ".npz" else path.parent
    return folder.resolve() == run_dir.resolve()


def build_server(
    cfg: RunConfig, settings: Settings | None = None
) -> tuple[CommunicationStrategy, int]:
    """The strategy, restored from ``resume-from`` when set, and the number of rounds still to run.

    A resumed strategy numbers its rounds from the checkpoint's round + 1 (Flower restarts at 1).
    """
    strategy = build_strategy(cfg, settings)
    path = resume_path(cfg)
    done = strategy.restore(path) if path is not None else 0
    return strategy, cfg.num_server_rounds - done


def server_fn(context: Context) -> ServerAppComponents:
    """Fail fast on a bad config, then hand Flower the strategy and the number of rounds.

    A refused config is logged as one line before Flower prints its traceback, so the reason
    is the first thing a user of plain ``flwr run`` reads (the run then ends
    ``finished:failed``: ``flwr ls``)."""
    try:
        cfg, settings = load_config(context.run_config)
        strategy, rounds = build_server(cfg, settings)
    except ConfigError as err:
        log(ERROR, "run refused: %s", err)
        raise
    # A client that misses the timeout becomes a failure of that round, not a hang.
    # With a link profile round-timeout is a modelled deadline (core.link), not Flower's wait.
    timeout = (cfg.round_timeout or None) if cfg.link_profile == "none" else None
    return ServerAppComponents(
        strategy=strategy, config=ServerConfig(num_rounds=rounds, round_timeout=timeout)
    )


app = ServerApp(server_fn=server_fn)
