"""The Flower adapter every strategy stands on: sampling, the trust boundary, evaluation, results.

A method subclasses ``CommunicationStrategy`` and fills in hooks that see plain arrays, example
counts and metrics, never Flower's message types:

* ``downlink_arrays(round, cid)``: what the server sends a client (default: the fp32 global);
* ``fit_config(round, cid)``: small per-client instructions sent with it;
* ``decode_update(round, reply)``: a client's arrays -> a ``ClientUpdate`` (raise ``ValueError``
  or ``PayloadError`` naming what is wrong: the message is rejected and the round goes on);
* ``aggregate(round, updates)``: the new float global model;
* optionally ``begin_round``, ``evaluation_state``, ``method_state``/``load_method_state`` and
  ``summary_fields``; method ``rounds.csv`` columns are declared in ``round_columns`` and
  filled with ``record_metrics``.

The base decodes each Flower message once, counts its bytes (``strategies.accounting``), checks
the fields every method relies on, and hands the hook a ``ClientReply``. Values computed once per
round (a quantized downlink shared by all clients) go through ``self.round_memo``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from torch import nn
from torch.utils.data import TensorDataset

from contracts.messages import PARTITION_ID, ROUND, TRAIN_LOSS
from core.config import RunConfig
from core.results import ResultsWriter
from core.settings import NoSettings, Settings
from core.torch_utils import evaluate_model, select_device
from core.wire_state import count_wire_scalars, get_wire_state, set_wire_state
from strategies.accounting import RoundTraffic, parameters_nbytes
from strategies.aggregation import ClientUpdate, mean_metric
from strategies.checkpointing import load_run, save_run
from strategies.reporting import RunProgress, log_round, round_row, summary

T = TypeVar("T")

__all__ = ["ClientReply", "ClientUpdate", "CommunicationStrategy", "PayloadError", "RoundMemo"]


class PayloadError(ValueError):
    """A client message that cannot be used; the message says why. The round goes on without it."""


@dataclass(frozen=True)
class ClientReply:
    """A client's fit reply with Flower's framing removed: what ``decode_update`` sees."""

    cid: str
    partition_id: int
    num_examples: int
    arrays: list[np.ndarray]
    metrics: dict[str, Scalar]

    def update(self, arrays: list[np.ndarray]) -> ClientUpdate:
        """The ``ClientUpdate`` of this reply with its decoded ``arrays``."""
        return ClientUpdate(
            self.cid, self.partition_id, self.num_examples, arrays, dict(self.metrics)
        )


class RoundMemo:
    """Values computed once per round and shared by its clients (e.g. a quantized downlink).

    Holds one round at a time: asking for another round drops everything of the previous one.
    """

    def __init__(self) -> None:
        self._round: int | None = None
        self._values: dict[Hashable, Any] = {}

    def get(self, server_round: int, key: Hashable, build: Callable[[], T]) -> T:
        if server_round != self._round:
            self._round, self._values = server_round, {}
        if key not in self._values:
            self._values[key] = build()
        return self._values[key]

    def clear(self) -> None:
        self._round, self._values = None, {}


class CommunicationStrategy(Strategy):
    """Base strategy; see the module docstring."""

    #: the uplink's name in rejection messages.
    uplink_name: ClassVar[str] = "uplink"
    #: method ``rounds.csv`` columns and their value in a round that recorded none.
    round_columns: ClassVar[Mapping[str, Scalar]] = {}

    def __init__(
        self,
        cfg: RunConfig,
        settings: Settings | None = None,
        *,
        model_fn: Callable[[], nn.Module],
        test_set: TensorDataset | None,
        results: ResultsWriter | None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.settings = settings if settings is not None else NoSettings()
        self.device = select_device(cfg.device)
        torch.manual_seed(cfg.seed)  # the initial global model depends on the seed only
        self.model = model_fn()
        self.global_state: list[np.ndarray] = get_wire_state(self.model)
        self.num_scalars = count_wire_scalars(self.model)
        self.test_set = test_set
        self.results = results
        self.progress = RunProgress()
        self.round_metrics: dict[int, dict[str, Scalar]] = {}
        self.round_memo = RoundMemo()
        self._round_started = self.progress.started

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strategy={self.cfg.strategy!r})"

    # ----------------------------------------------------------------- hooks for methods
    def begin_round(self, server_round: int, clients: list[ClientProxy]) -> None:
        """Called once per round with the sampled clients, before any downlink is built
        (e.g. DAdaQuant assigns each client its level here)."""

    def downlink_arrays(self, server_round: int, cid: str) -> list[np.ndarray]:
        """Arrays sent to client ``cid``; default: the full-precision global model."""
        return self.global_state

    def fit_config(self, server_round: int, cid: str) -> dict[str, Scalar]:
        """Extra per-client instructions sent with the arrays (small scalars)."""
        return {}

    def decode_update(self, server_round: int, reply: ClientReply) -> ClientUpdate:
        """Turn a client's arrays into a ``ClientUpdate``; raise ``ValueError`` if unusable."""
        raise NotImplementedError

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        """Combine the valid updates (sorted by partition id) into the new global model."""
        raise NotImplementedError

    def evaluation_state(self, server_round: int) -> list[np.ndarray]:
        """Model evaluated after ``server_round``; a lossy-downlink method may evaluate what
        clients will receive in the next round."""
        return self.global_state

    def method_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Method state a checkpoint must keep beyond the global model (arrays, JSON scalars)."""
        return {}, {}

    def load_method_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Inverse of ``method_state``."""

    def summary_fields(self) -> dict[str, Any]:
        """Method fields added to ``summary.json``."""
        return {}

    def record_metrics(self, server_round: int, **values: Scalar) -> None:
        """Set method columns (declared in ``round_columns``) of a round's ``rounds.csv`` row."""
        unknown = set(values) - set(self.round_columns)
        if unknown:
            raise KeyError(f"undeclared round columns {sorted(unknown)}")
        self.round_metrics.setdefault(server_round, {}).update(values)

    # ----------------------------------------------------------------- Flower Strategy API
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.global_state)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        server_round += self.progress.round_offset
        self._round_started = time.perf_counter()
        clients = self.sample_clients(server_round, client_manager)
        self.begin_round(server_round, clients)
        traffic = self.progress.traffic.round(server_round)
        instructions = []
        for client in clients:
            payload = self.downlink_parameters(server_round, client.cid)
            config: dict[str, Scalar] = {ROUND: server_round}
            config.update(self.fit_config(server_round, client.cid))
            traffic.downlink_bytes += parameters_nbytes(payload)
            traffic.downlink_messages += 1
            instructions.append((client, FitIns(payload, config)))
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        server_round += self.progress.round_offset
        traffic = self.progress.traffic.round(server_round)
        traffic.failures += len(failures)
        for failure in failures:
            log(WARNING, "round %d: a client failed: %s", server_round, _describe_failure(failure))
        updates: list[ClientUpdate] = []
        for client, fit_res in results:
            traffic.uplink_bytes += parameters_nbytes(fit_res.parameters)
            traffic.uplink_messages += 1
            try:
                updates.append(self.decode_uplink(server_round, client.cid, fit_res))
            except PayloadError as err:
                traffic.rejected += 1
                log(
                    WARNING,
                    "round %d: rejected payload of client %s: %s",
                    server_round,
                    client.cid,
                    err,
                )
        # A fixed order makes float sums, and so the whole run, independent of arrival order.
        updates.sort(key=lambda u: (u.partition_id, u.cid))
        minimum = self.cfg.min_fit_results
        if len(updates) >= minimum:
            self.global_state = self.aggregate(server_round, updates)
        else:
            log(
                WARNING,
                "round %d: %d usable client updates (< min-fit-results %d): round "
                "skipped, global model unchanged",
                server_round,
                len(updates),
                minimum,
            )
        self.progress.last_train_loss = mean_metric(updates, TRAIN_LOSS)
        return ndarrays_to_parameters(self.global_state), {"clients": len(updates)}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []  # evaluation is centralized on the server's held-out test set

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        server_round += self.progress.round_offset
        if self.test_set is None:
            return None
        if self.progress.recorded(server_round):
            return None  # round k of a resumed run: recorded before the restart
        set_wire_state(self.model, self.evaluation_state(server_round))
        loss, accuracy = evaluate_model(self.model, self.test_set, self.device)
        self._record_round(server_round, loss, accuracy)
        return loss, {"accuracy": accuracy}

    # ----------------------------------------------------------------- the trust boundary
    def decode_uplink(self, server_round: int, cid: str, fit_res: FitRes) -> ClientUpdate:
        """A client's ``FitRes`` -> ``ClientUpdate``, or ``PayloadError`` saying why not.

        The fields every method relies on are checked here, the tensors deserialized once, and
        anything the method's ``decode_update`` raises becomes a rejection of this message.
        """
        if fit_res.num_examples <= 0:
            raise PayloadError(f"num_examples must be positive, got {fit_res.num_examples}")
        partition = fit_res.metrics.get(PARTITION_ID)
        if not isinstance(partition, int) or isinstance(partition, bool):
            raise PayloadError(f"metrics[{PARTITION_ID!r}] must be an int, got {partition!r}")
        try:
            arrays = parameters_to_ndarrays(fit_res.parameters)
        except Exception as err:  # np.load raises several types on garbage
            raise PayloadError(
                f"{self.uplink_name}: undecodable tensor: {type(err).__name__}: {err}"
            ) from None
        reply = ClientReply(cid, partition, fit_res.num_examples, arrays, dict(fit_res.metrics))
        try:
            return self.decode_update(server_round, reply)
        except PayloadError:
            raise
        except Exception as err:  # wrong sizes, dtypes or values: the codecs say which
            raise PayloadError(f"{self.uplink_name}: {err}") from None

    # ----------------------------------------------------------------- shared machinery
    def sample_clients(self, server_round: int, client_manager: ClientManager) -> list[ClientProxy]:
        """Seeded sampling of ``fraction-fit`` of the available clients.

        Flower's own ``ClientManager.sample`` uses the unseeded ``random`` module; here the choice
        depends on (seed, round) and the sorted node ids only.
        """
        client_manager.wait_for(self.cfg.min_available_clients)
        available = client_manager.all()
        cids = sorted(available, key=_cid_sort_key)
        self.progress.num_clients = max(self.progress.num_clients, len(cids))
        count = max(1, int(round(self.cfg.fraction_fit * len(cids))))
        rng = np.random.default_rng([self.cfg.seed, server_round])
        chosen = np.sort(rng.choice(len(cids), size=count, replace=False))
        return [available[cids[i]] for i in chosen]

    def downlink_parameters(self, server_round: int, cid: str) -> Parameters:
        """Serialized downlink for ``cid``; a list object returned for several clients of a round
        is serialized once (the bytes still count once per client)."""
        arrays = self.downlink_arrays(server_round, cid)
        # The memo keeps ``arrays`` alive for the round, so its id is not reused meanwhile.
        _, parameters = self.round_memo.get(
            server_round,
            ("serialized", id(arrays)),
            lambda: (arrays, ndarrays_to_parameters(arrays)),
        )
        return parameters

    @property
    def traffic(self) -> dict[int, RoundTraffic]:
        """Bytes and messages per round (``strategies.accounting``)."""
        return self.progress.traffic

    @property
    def history(self) -> list[dict[str, Any]]:
        """The ``rounds.csv`` rows recorded so far."""
        return self.progress.history

    @property
    def round_offset(self) -> int:
        return self.progress.round_offset

    def summary(self) -> dict[str, Any]:
        """The ``summary.json`` content for the rounds recorded so far."""
        return {
            **summary(self.cfg, self.progress, self.num_scalars, str(self.device)),
            **self.summary_fields(),
        }

    def round_row(self, server_round: int, loss: float, accuracy: float) -> dict[str, Any]:
        """The ``rounds.csv`` row of a round: common columns, then the method's."""
        return round_row(
            server_round,
            loss,
            accuracy,
            self.progress.traffic.get(server_round, RoundTraffic()),
            self.num_scalars,
            self.progress.last_train_loss,
            time.perf_counter() - self._round_started,
            {**self.round_columns, **self.round_metrics.get(server_round, {})},
        )

    def _record_round(self, server_round: int, loss: float, accuracy: float) -> None:
        row = self.round_row(server_round, loss, accuracy)
        self.progress.history.append(row)
        log_round(self.cfg.strategy, self.cfg.num_server_rounds, row)
        if self.results is not None:
            self.results.write_round(row)
            self.results.write_summary(self.summary())
            if self.cfg.checkpoint:
                self.save_checkpoint(server_round)

    # ----------------------------------------------------------------- checkpoint and resume
    def save_checkpoint(self, server_round: int) -> None:
        """Global model, method state, results so far: all a restart needs to go on at +1."""
        assert self.results is not None
        method_arrays, method_meta = self.method_state()
        save_run(
            self.results.run_dir,
            self.cfg,
            server_round,
            self.global_state,
            self.progress,
            method_arrays,
            method_meta,
        )

    def restore(self, path: Path) -> int:
        """Load a checkpoint; returns the number of rounds already done (the round offset)."""
        restored = load_run(path, self.cfg, self.global_state)
        self.global_state = restored.global_state
        self.load_method_state(restored.method_arrays, restored.method_meta)
        self.progress = restored.progress
        self.round_memo.clear()
        if self.results is not None:
            self.results.rewrite_rounds(self.progress.history)
            self.results.write_summary(self.summary())
        log(INFO, "resumed from %s after round %d", path, restored.round)
        return restored.round


def _cid_sort_key(cid: str) -> tuple[int, str]:
    return (int(cid), cid) if cid.isdigit() else (0, cid)


def _describe_failure(failure: tuple[ClientProxy, FitRes] | BaseException) -> str:
    if isinstance(failure, BaseException):
        return f"{type(failure).__name__}: {failure}"
    client, res = failure
    return f"client {client.cid}: status {res.status.code.name}: {res.status.message}"
