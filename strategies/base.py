"""Common base of every strategy: sampling, byte accounting, central evaluation, results.

A method subclasses ``CommunicationStrategy`` and fills in three hooks:

* ``downlink_arrays(round, cid)`` -> what the server sends a client (default: the fp32 global);
* ``decode_uplink(round, cid, fit_res)`` -> a ``ClientUpdate`` or ``PayloadError`` with the reason;
* ``aggregate(round, updates)`` -> the new float global model.

Everything that travels is measured here, from the serialized ``Parameters.tensors`` Flower puts
on the wire, never from a nominal bit-width:

    bpp (per direction) = 8 * bytes / num_scalars / messages

where ``num_scalars`` is the number of scalars in a plain FedAvg message of the model (its wire
state, see ``fl_app.torch_utils``) and ``messages`` the number of client messages in that direction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

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

from compression.layout import split_flat
from fl_app.checkpoint import load_checkpoint, save_checkpoint
from fl_app.config import RunConfig
from fl_app.results import ResultsWriter
from fl_app.torch_utils import (
    count_wire_scalars,
    evaluate_model,
    get_wire_state,
    select_device,
    set_wire_state,
)


class PayloadError(ValueError):
    """A client message that cannot be used; the message says why. The round goes on without it."""


@dataclass
class ClientUpdate:
    """One decoded client message, ready for aggregation."""

    cid: str
    partition_id: int
    num_examples: int
    arrays: list[np.ndarray]
    metrics: dict[str, Scalar] = field(default_factory=dict)

    @classmethod
    def of(cls, cid: str, fit_res: FitRes, arrays: list[np.ndarray]) -> ClientUpdate:
        """The update of a message whose metrics the base already validated (``partition-id``)."""
        return cls(
            cid,
            int(fit_res.metrics["partition-id"]),
            fit_res.num_examples,
            arrays,
            dict(fit_res.metrics),
        )


@dataclass
class RoundTraffic:
    """Bytes and messages of one round, per direction, as serialized on the wire."""

    uplink_bytes: int = 0
    downlink_bytes: int = 0
    uplink_messages: int = 0
    downlink_messages: int = 0
    failures: int = 0
    rejected: int = 0


def parameters_nbytes(parameters: Parameters) -> int:
    """Bytes of a ``Parameters`` payload: the serialized tensors Flower transmits."""
    return sum(len(tensor) for tensor in parameters.tensors)


def bits_per_parameter(nbytes: int, num_scalars: int, messages: int) -> float:
    """The one definition of bpp used everywhere (0 when nothing was sent)."""
    if messages == 0 or num_scalars == 0:
        return 0.0
    return 8.0 * nbytes / num_scalars / messages


def decode_float_arrays(fit_res: FitRes, reference: list[np.ndarray]) -> list[np.ndarray]:
    """Deserialize a full-precision model payload and check it matches ``reference``.

    Raises ``PayloadError`` naming the first problem: undecodable bytes, wrong number of arrays,
    wrong shape, non-float dtype or non-finite values.
    """
    try:
        arrays = parameters_to_ndarrays(fit_res.parameters)
    except Exception as err:  # np.load raises several types on garbage
        raise PayloadError(f"undecodable tensor: {type(err).__name__}: {err}") from None
    if len(arrays) != len(reference):
        raise PayloadError(f"expected {len(reference)} arrays, got {len(arrays)}")
    for index, (array, ref) in enumerate(zip(arrays, reference, strict=True)):
        if array.shape != ref.shape:
            raise PayloadError(f"array {index}: expected shape {ref.shape}, got {array.shape}")
        if not np.issubdtype(array.dtype, np.floating):
            raise PayloadError(f"array {index}: expected a float dtype, got {array.dtype}")
        if not np.all(np.isfinite(array)):
            raise PayloadError(f"array {index}: contains NaN or infinity")
    return arrays


def place_flat(
    state: list[np.ndarray],
    indices: list[int],
    flat: np.ndarray,
    shapes: tuple[tuple[int, ...], ...],
) -> None:
    """Write the float32 pieces of a concatenated vector (e.g. the extras) into ``state``."""
    pieces = split_flat(np.asarray(flat, dtype=np.float32), shapes)
    for index, piece in zip(indices, pieces, strict=True):
        state[index] = piece.copy()


def weighted_average(updates: list[ClientUpdate]) -> list[np.ndarray]:
    """Example-weighted mean of the clients' arrays, accumulated in float64."""
    total = sum(update.num_examples for update in updates)
    result = [np.zeros(a.shape, dtype=np.float64) for a in updates[0].arrays]
    for update in updates:
        weight = update.num_examples / total
        for acc, array in zip(result, update.arrays, strict=True):
            acc += weight * array
    return [acc.astype(np.float32) for acc in result]


class CommunicationStrategy(Strategy):
    """Base strategy; subclasses implement ``decode_uplink`` and ``aggregate``."""

    #: method-specific ``rounds.csv`` columns that ``round_row`` adds.
    extra_columns: tuple[str, ...] = ()

    def __init__(
        self,
        cfg: RunConfig,
        *,
        model_fn: Callable[[], nn.Module],
        test_set: TensorDataset | None,
        results: ResultsWriter | None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.device = select_device(cfg.device)
        torch.manual_seed(cfg.seed)  # the initial global model depends on the seed only
        self.model = model_fn()
        self.global_state: list[np.ndarray] = get_wire_state(self.model)
        self.num_scalars = count_wire_scalars(self.model)
        self.test_set = test_set
        self.results = results
        self.traffic: dict[int, RoundTraffic] = {}
        self.history: list[dict[str, Any]] = []
        self.num_clients = 0
        # Rounds completed before this process started (resume); Flower counts from 1 again.
        self.round_offset = 0
        self.started = time.perf_counter()
        self._round_started = self.started
        # (round, arrays, serialized): holding the list keeps its identity from being reused.
        self._downlink_cache: tuple[int, list[np.ndarray], Parameters] | None = None

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

    def decode_uplink(self, server_round: int, cid: str, fit_res: FitRes) -> ClientUpdate:
        """Turn a client's payload into a ``ClientUpdate``; raise ``PayloadError`` if unusable."""
        raise NotImplementedError

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        """Combine the valid updates (sorted by partition id) into the new global model."""
        raise NotImplementedError

    def evaluation_state(self) -> list[np.ndarray]:
        """Model evaluated centrally; a lossy-downlink method may evaluate what clients get."""
        return self.global_state

    def method_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Method state a checkpoint must keep beyond the global model (arrays, JSON scalars)."""
        return {}, {}

    def load_method_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Inverse of ``method_state``."""

    # ----------------------------------------------------------------- Flower Strategy API
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.global_state)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        server_round += self.round_offset
        self._round_started = time.perf_counter()
        clients = self.sample_clients(server_round, client_manager)
        self.begin_round(server_round, clients)
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        instructions = []
        for client in clients:
            payload = self.downlink_parameters(server_round, client.cid)
            config: dict[str, Scalar] = {"server-round": server_round}
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
        server_round += self.round_offset
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        traffic.failures += len(failures)
        for failure in failures:
            log(WARNING, "round %d: a client failed: %s", server_round, _describe_failure(failure))
        updates: list[ClientUpdate] = []
        for client, fit_res in results:
            traffic.uplink_bytes += parameters_nbytes(fit_res.parameters)
            traffic.uplink_messages += 1
            try:
                updates.append(self._decode(server_round, client.cid, fit_res))
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
        minimum = int(self.cfg["min-fit-results"])
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
        self._last_train_loss = _mean_metric(updates, "train-loss")
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
        server_round += self.round_offset
        if self.test_set is None:
            return None
        if any(row["round"] == server_round for row in self.history):
            return None  # round k of a resumed run: recorded before the restart
        set_wire_state(self.model, self.evaluation_state())
        loss, accuracy = evaluate_model(self.model, self.test_set, self.device)
        self._record_round(server_round, loss, accuracy)
        return loss, {"accuracy": accuracy}

    # ----------------------------------------------------------------- shared machinery
    def sample_clients(self, server_round: int, client_manager: ClientManager) -> list[ClientProxy]:
        """Seeded sampling of ``fraction-fit`` of the available clients.

        Flower's own ``ClientManager.sample`` uses the unseeded ``random`` module; here the choice
        depends on (seed, round) and the sorted node ids only.
        """
        client_manager.wait_for(int(self.cfg["min-available-clients"]))
        available = client_manager.all()
        cids = sorted(available, key=_cid_sort_key)
        self.num_clients = max(self.num_clients, len(cids))
        count = max(1, int(round(float(self.cfg["fraction-fit"]) * len(cids))))
        rng = np.random.default_rng([self.cfg.seed, server_round])
        chosen = np.sort(rng.choice(len(cids), size=count, replace=False))
        return [available[cids[i]] for i in chosen]

    def downlink_parameters(self, server_round: int, cid: str) -> Parameters:
        """Serialized downlink for ``cid``; a list object returned for several clients of a round
        is serialized once (the bytes still count once per client)."""
        arrays = self.downlink_arrays(server_round, cid)
        cache = self._downlink_cache
        if cache is None or cache[0] != server_round or cache[1] is not arrays:
            cache = self._downlink_cache = (server_round, arrays, ndarrays_to_parameters(arrays))
        return cache[2]

    def _decode(self, server_round: int, cid: str, fit_res: FitRes) -> ClientUpdate:
        if fit_res.num_examples <= 0:
            raise PayloadError(f"num_examples must be positive, got {fit_res.num_examples}")
        partition = fit_res.metrics.get("partition-id")
        if not isinstance(partition, int) or isinstance(partition, bool):
            raise PayloadError(f"metrics['partition-id'] must be an int, got {partition!r}")
        return self.decode_uplink(server_round, cid, fit_res)

    def round_row(self, server_round: int, loss: float, accuracy: float) -> dict[str, Any]:
        """The ``rounds.csv`` row of a round (round 0 = the initial model, no traffic)."""
        traffic = self.traffic.get(server_round, RoundTraffic())
        return {
            "round": server_round,
            "accuracy": accuracy,
            "loss": loss,
            "train_loss": self._last_train_loss if server_round > 0 else float("nan"),
            "uplink_bytes": traffic.uplink_bytes,
            "downlink_bytes": traffic.downlink_bytes,
            "uplink_bpp": bits_per_parameter(
                traffic.uplink_bytes, self.num_scalars, traffic.uplink_messages
            ),
            "downlink_bpp": bits_per_parameter(
                traffic.downlink_bytes, self.num_scalars, traffic.downlink_messages
            ),
            "clients": traffic.uplink_messages - traffic.rejected,
            "failures": traffic.failures,
            "rejected": traffic.rejected,
            "seconds": time.perf_counter() - self._round_started if server_round > 0 else 0.0,
        }

    def summary(self) -> dict[str, Any]:
        """The ``summary.json`` content for the rounds recorded so far."""
        totals = RoundTraffic()
        for traffic in self.traffic.values():
            totals.uplink_bytes += traffic.uplink_bytes
            totals.downlink_bytes += traffic.downlink_bytes
            totals.uplink_messages += traffic.uplink_messages
            totals.downlink_messages += traffic.downlink_messages
            totals.failures += traffic.failures
            totals.rejected += traffic.rejected
        last = self.history[-1] if self.history else {}
        best = max(self.history, key=lambda row: row["accuracy"]) if self.history else {}
        rounds_done = int(last.get("round", 0))
        return {
            "strategy": self.cfg.strategy,
            "dataset": self.cfg.dataset,
            "model": self.cfg.model,
            "partitioner": self.cfg.partitioner,
            "num_clients": self.num_clients,
            "num_rounds": self.cfg.num_rounds,
            "rounds_completed": rounds_done,
            "completed": rounds_done >= self.cfg.num_rounds,
            "num_params": self.num_scalars,
            "final_accuracy": last.get("accuracy"),
            "final_loss": last.get("loss"),
            "best_accuracy": best.get("accuracy"),
            "best_round": best.get("round"),
            "uplink_bytes": totals.uplink_bytes,
            "downlink_bytes": totals.downlink_bytes,
            "uplink_messages": totals.uplink_messages,
            "downlink_messages": totals.downlink_messages,
            "uplink_bpp": bits_per_parameter(
                totals.uplink_bytes, self.num_scalars, totals.uplink_messages
            ),
            "downlink_bpp": bits_per_parameter(
                totals.downlink_bytes, self.num_scalars, totals.downlink_messages
            ),
            "failures": totals.failures,
            "rejected": totals.rejected,
            "wall_seconds": time.perf_counter() - self.started,
            "device": str(self.device),
            "config": self.cfg.as_dict(),
        }

    def _record_round(self, server_round: int, loss: float, accuracy: float) -> None:
        row = self.round_row(server_round, loss, accuracy)
        self.history.append(row)
        mb = 1024 * 1024
        log(
            INFO,
            "[%s] round %d/%d | acc %.4f | loss %.4f | up %.3f MB | down %.3f MB | "
            "bpp up %.3f | bpp down %.3f | clients %d | %.1f s",
            self.cfg.strategy,
            server_round,
            self.cfg.num_rounds,
            accuracy,
            loss,
            row["uplink_bytes"] / mb,
            row["downlink_bytes"] / mb,
            row["uplink_bpp"],
            row["downlink_bpp"],
            row["clients"],
            row["seconds"],
        )
        if self.results is not None:
            self.results.write_round(row)
            self.results.write_summary(self.summary())
            if bool(self.cfg["checkpoint"]):
                self.save_checkpoint(server_round)

    # ----------------------------------------------------------------- checkpoint and resume
    def save_checkpoint(self, server_round: int) -> None:
        """Global model, method state, results so far: all a restart needs to go on at +1."""
        assert self.results is not None
        method_arrays, method_meta = self.method_state()
        arrays = {f"global/{i}": a for i, a in enumerate(self.global_state)}
        arrays.update({f"method/{name}": a for name, a in method_arrays.items()})
        meta = {
            "strategy": self.cfg.strategy,
            "model": self.cfg.model,
            "round": server_round,
            "history": self.history,
            "traffic": {str(r): vars(t) for r, t in self.traffic.items()},
            "num_clients": self.num_clients,
            "wall_seconds": time.perf_counter() - self.started,
            "last_train_loss": self._last_train_loss,
            "method": method_meta,
        }
        save_checkpoint(self.results.run_dir, arrays, meta)

    def restore(self, path: Path) -> int:
        """Load a checkpoint; returns the number of rounds already done (the round offset)."""
        arrays, meta = load_checkpoint(path)
        for key in ("strategy", "model"):
            if meta.get(key) != self.cfg[key]:
                raise ValueError(
                    f"checkpoint {path} was written by {key} {meta.get(key)!r}, "
                    f"this run has {key} {self.cfg[key]!r}"
                )
        state = [arrays[f"global/{i}"] for i in range(len(self.global_state))]
        for index, (got, want) in enumerate(zip(state, self.global_state, strict=True)):
            if got.shape != want.shape:
                raise ValueError(f"checkpoint {path} does not match this model (array {index})")
        self.global_state = state
        self.load_method_state(
            {k.removeprefix("method/"): v for k, v in arrays.items() if k.startswith("method/")},
            meta["method"],
        )
        self.round_offset = int(meta["round"])
        self.history = list(meta["history"])
        self.traffic = {int(r): RoundTraffic(**t) for r, t in meta["traffic"].items()}
        self.num_clients = int(meta["num_clients"])
        self.started = time.perf_counter() - float(meta["wall_seconds"])
        self._last_train_loss = float(meta.get("last_train_loss", float("nan")))
        if self.results is not None:
            self.results.rewrite_rounds(self.history)
            self.results.write_summary(self.summary())
        log(INFO, "resumed from %s after round %d", path, self.round_offset)
        return self.round_offset

    _last_train_loss: float = float("nan")


def _mean_metric(updates: list[ClientUpdate], key: str) -> float:
    """Example-weighted mean of a numeric client metric (NaN when no client reported it)."""
    pairs = [
        (float(u.metrics[key]), u.num_examples)
        for u in updates
        if isinstance(u.metrics.get(key), int | float)
    ]
    if not pairs:
        return float("nan")
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total


def _cid_sort_key(cid: str) -> tuple[int, str]:
    return (int(cid), cid) if cid.isdigit() else (0, cid)


def _describe_failure(failure: tuple[ClientProxy, FitRes] | BaseException) -> str:
    if isinstance(failure, BaseException):
        return f"{type(failure).__name__}: {failure}"
    client, res = failure
    return f"client {client.cid}: status {res.status.code.name}: {res.status.message}"
