"""The Flower adapter every strategy stands on: sampling, the trust boundary, evaluation, results.

A method subclasses ``CommunicationStrategy`` and fills in hooks that see plain arrays, example
counts and metrics, never Flower's message types:

* ``downlink_arrays(round, cid)``: what the server sends a client (default: the fp32 global);
* ``fit_config(round, cid)``: small per-client instructions sent with it;
* ``decode_update(round, reply)``: a client's arrays -> a ``ClientUpdate`` carrying its
  ``delta`` (the change of the global model it proposes, ``strategies.aggregation``; raise
  ``ValueError`` or ``PayloadError`` naming what is wrong: the message is rejected and the
  round goes on);
* ``client_weights(updates)`` and ``segment_sizes()``: how deltas are weighted (default: by
  examples, one segment); ``aggregate(round, updates)`` combines them with bounded influence
  (override only to record metrics, or, like SignSGD, to vote instead of averaging);
* optionally ``begin_round``, ``evaluation_state``, ``method_state``/``load_method_state`` and
  ``summary_fields``; method ``rounds.csv`` columns are declared in ``round_columns`` and
  filled with ``record_metrics``.

The base is the trust boundary: it decodes each Flower message once, counts its bytes
(``strategies.accounting``), checks what every method relies on (example count, partition id
bound to the client, training metrics typed and finite) before the method's own checks, and
after them that every decoded value is finite; only then may a message touch any state.
Claimed example counts are capped (``max-examples``), deltas are norm-bounded and combined by
``aggregation``, and the aggregate itself is checked before it replaces the global model.
Values computed once per round (a quantized downlink shared by all clients) go through
``self.round_memo``.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
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
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from torch import nn
from torch.utils.data import TensorDataset

from compression.downlink_codec import UQMessage
from compression.layout import concat_flat, split_flat
from contracts.downlink import Downlink
from contracts.messages import PARTITION_ID, ROUND, TORCH_THREADS, TRAIN_LOSS, TRAIN_SECONDS
from core.config import AUTO, LEGACY_VALUES, RunConfig
from core.plots import PLOT_NAME, plot_run
from core.results import ResultsWriter
from core.run_identity import check_federation_size
from core.seeding import derive_seed, numpy_rng
from core.settings import ConfigError, NoSettings, Settings
from core.torch_utils import (
    apply_thread_count,
    auto_thread_count,
    evaluate_model,
    select_device,
)
from core.wire_state import count_wire_scalars, get_wire_state, set_wire_state, wire_keys
from strategies.accounting import RoundTraffic, parameters_nbytes
from strategies.aggregation import (
    MAX_MAGNITUDE,
    ClientUpdate,
    aggregate_problem,
    clip_norms,
    combine,
    example_shares,
    implausible,
    lower_median,
    mean_metric,
    robust_shortfall,
)
from strategies.checkpointing import load_run, save_run
from strategies.link_timing import RoundClients, profile_of, transport_of
from strategies.references import ReferenceBook
from strategies.reporting import RunProgress, log_round, round_row, summary

T = TypeVar("T")
#: salts of the server's own random streams.
INIT_SALT, SAMPLING_SALT, DOWNLINK_SALT = 0x1417, 0x5A3, 0xD0E1

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
    #: False where the method's paper fixes a compressed downlink of its own (FedBiF's m-bit
    #: words, LBI-FL's k_w-bit weights, SignSGD's vote): ``downlink=fp16|uq`` is refused.
    generic_downlink: ClassVar[bool] = True
    #: True where the method's own codecs honour ``entropy=ans`` (FedBiF, FedPAQ, QSGD,
    #: DAdaQuant, clipped UQ, LBI-FL); elsewhere it applies only to ``downlink=uq`` codes.
    entropy_codes: ClassVar[bool] = False
    #: True where the method's downlink codes can be sent against the client's last codes
    #: (``downlink-reference=last``; FedBiF's words).
    reference_codes: ClassVar[bool] = False
    #: True where the method's uplink codes can be sent against the codes the client received
    #: that round (``uplink-reference=received``; FedBiF's activated bits, LBI-FL's weights).
    uplink_reference_codes: ClassVar[bool] = False

    @classmethod
    def resolve_wire(cls, cfg: RunConfig) -> dict[str, str]:
        """What ``auto`` stands for in this method's lossless wire keys (``entropy``,
        ``downlink-reference``, ``uplink-reference``): each stage wherever the method has codes
        it applies to. Measured, they change no model bit and cost under 3% of a local epoch
        (``benchmarks/README.md``, "The wire at its limit"). Keys set explicitly stay as set."""
        resolved: dict[str, str] = {}
        entropy = cfg.entropy
        if entropy == AUTO:
            entropy = "ans" if cls.entropy_codes or cfg.downlink == "uq" else "none"
            resolved["entropy"] = entropy
        if cfg.downlink_reference == AUTO:
            applies = cls.reference_codes or (cls.generic_downlink and cfg.downlink == "uq")
            resolved["downlink-reference"] = "last" if applies and entropy == "ans" else "none"
        if cfg.uplink_reference == AUTO:
            applies = cls.uplink_reference_codes and entropy == "ans"
            resolved["uplink-reference"] = "received" if applies else "none"
        return resolved

    @classmethod
    def check_downlink(cls, cfg: RunConfig, settings: Settings) -> None:
        """Refuse, at start, a ``downlink`` mode this method cannot send (``ConfigError``)."""
        if Downlink.from_config(cfg).active and not cls.generic_downlink:
            raise ConfigError(
                f"downlink={cfg.downlink!r}: strategy {cfg.strategy!r} sends its paper's own "
                f"compressed downlink; use downlink='method' (fp16 and uq apply to the methods "
                f"that send the float32 model)"
            )
        if cfg.entropy != "none" and not (cls.entropy_codes or cfg.downlink == "uq"):
            raise ConfigError(
                f"entropy={cfg.entropy!r}: strategy {cfg.strategy!r} sends no code array the "
                f"entropy stage applies to; use downlink='uq' with it, or entropy='none'"
            )
        if cfg.downlink_reference != "none":
            generic = cls.generic_downlink and cfg.downlink == "uq"
            if not (cls.reference_codes or generic):
                raise ConfigError(
                    f"downlink-reference={cfg.downlink_reference!r}: strategy {cfg.strategy!r} "
                    "has no downlink codes to send against a client's last ones (fedbif's words "
                    "and downlink='uq' codes have); use downlink-reference='none'"
                )
            if cfg.entropy != "ans":
                raise ConfigError(
                    f"downlink-reference={cfg.downlink_reference!r} saves bits only through the "
                    "entropy stage; set entropy='ans' (or downlink-reference='none')"
                )
        if cfg.uplink_reference != "none":
            if not cls.uplink_reference_codes:
                raise ConfigError(
                    f"uplink-reference={cfg.uplink_reference!r}: strategy {cfg.strategy!r} "
                    "uploads no codes that can be sent against the codes it received (fedbif "
                    "and lbi-fl do); use uplink-reference='none'"
                )
            if cfg.entropy != "ans":
                raise ConfigError(
                    f"uplink-reference={cfg.uplink_reference!r} saves bits only through the "
                    "entropy stage; set entropy='ans' (or uplink-reference='none')"
                )

    def __init__(
        self,
        cfg: RunConfig,
        settings: Settings | None = None,
        *,
        model_fn: Callable[[], nn.Module],
        test_set: TensorDataset | None,
        results: ResultsWriter | None,
        partition_sizes: Callable[[int], list[int] | None] | None = None,
        validation_set: TensorDataset | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.settings = settings if settings is not None else NoSettings()
        self.device = select_device(cfg.device)
        self.torch_threads = apply_thread_count(
            auto_thread_count(cfg.server_torch_threads or cfg.torch_threads, None)
        )
        #: the thread counts the clients reported (fit metric ``torch-threads``).
        self.client_threads: set[int] = set()
        torch.manual_seed(derive_seed(cfg.seed, INIT_SALT))  # the initial model: seed only
        self.model = model_fn()
        self.global_state: list[np.ndarray] = get_wire_state(self.model)
        self.num_scalars = count_wire_scalars(self.model)
        self.test_set = test_set
        #: the run's validation split (``validation-fraction`` > 0), scored each round beside
        #: the test set so settings can be chosen without looking at test accuracy.
        self.validation_set = validation_set
        self.results = results
        self.progress = RunProgress()
        self.round_metrics: dict[int, dict[str, Scalar]] = {}
        self.round_memo = RoundMemo()
        self.downlink = Downlink.from_config(cfg)
        #: ``downlink-reference=last``: which round's codes each client holds.
        self.references = ReferenceBook(int(self.cfg.reference_memory_mb * 1e6))
        #: what this round's deltas are relative to (set while a round is aggregated).
        self._delta_base: list[np.ndarray] | None = None
        self._round_started = self.progress.started
        self.shapes = [a.shape for a in self.global_state]
        self.num_flat = sum(int(a.size) for a in self.global_state)
        #: (number of partitions) -> each partition's size, where the server can compute it.
        self.partition_sizes = partition_sizes
        self._sizes: tuple[int, list[int] | None] | None = None
        #: cid -> the partition it first claimed: a client cannot switch partitions.
        self.partitions: dict[str, int] = {}
        #: the run's modelled client links (``link-profile``; None: not modelled), and what the
        #: server sent and received per client in the round being run (``clients.csv``).
        self.link_profile = profile_of(cfg)
        self._clients: RoundClients | None = None
        #: BatchNorm running variances: a lossy mean of deltas can push them below zero.
        self._variance_indices = [
            i for i, key in enumerate(wire_keys(self.model)) if key.endswith("running_var")
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strategy={self.cfg.strategy!r})"

    # ----------------------------------------------------------------- hooks for methods
    def begin_round(self, server_round: int, clients: list[ClientProxy]) -> None:
        """Called once per round with the sampled clients, before any downlink is built
        (e.g. DAdaQuant assigns each client its level here)."""

    def downlink_arrays(self, server_round: int, cid: str) -> list[np.ndarray]:
        """Arrays sent to client ``cid``; default: the global model, as ``downlink`` says
        (``downlink-reference=last``: the codes against the ones ``cid`` kept, if any)."""
        if not self.downlink.active:
            return self.global_state
        basis = self.references.basis_for(cid) if self.downlink.reference else None
        if basis is None:
            return self.generic_downlink_message(server_round)[0]
        return self.round_memo.get(
            server_round,
            ("generic-downlink-against", basis.round),
            lambda: self.downlink.wire(self._generic_quantized(server_round), basis),
        )

    def _generic_quantized(self, server_round: int) -> UQMessage:
        """The round's ``downlink=uq`` codes, scales and extras (stochastic rounding seeded by
        seed and round)."""
        return self.round_memo.get(
            server_round,
            "generic-quantized",
            lambda: self.downlink.quantize(
                self.global_state, numpy_rng(self.cfg.seed, server_round, DOWNLINK_SALT)
            ),
        )

    def generic_downlink_message(
        self, server_round: int
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(message, the float32 state clients decode from it) of ``downlink=fp16|uq``; one
        per round (every client gets the same; reference-coded ones stand for the same state)."""

        def build() -> tuple[list[np.ndarray], list[np.ndarray]]:
            if self.downlink.mode == "uq":
                arrays = self.downlink.wire(self._generic_quantized(server_round))
            else:
                arrays = self.downlink.encode(self.global_state)
            return arrays, self.downlink.decode(arrays, self.shapes)

        return self.round_memo.get(server_round, "generic-downlink", build)

    def delta_base(self, server_round: int) -> list[np.ndarray]:
        """What clients started the round from: the decoded generic downlink where it is lossy,
        else the global model. A client's change is measured against it (``delta_of``) and
        added to the server's float32 model (``apply_delta``)."""
        if not self.downlink.active:
            return self.global_state
        return self.generic_downlink_message(server_round)[1]

    def fit_config(self, server_round: int, cid: str) -> dict[str, Scalar]:
        """Extra per-client instructions sent with the arrays (small scalars)."""
        return {}

    def end_round(self, server_round: int, sent: Iterable[str], accepted: set[str]) -> None:
        """Called after a round's replies were checked: ``sent`` are the clients the round's
        downlink went to, ``accepted`` those whose update was accepted (reference coding notes
        which codes each client holds)."""
        if self.downlink.reference:
            self.references.end_round(
                server_round, sent, accepted, lambda: self._generic_quantized(server_round).codes
            )

    def decode_update(self, server_round: int, reply: ClientReply) -> ClientUpdate:
        """Turn a client's arrays into a ``ClientUpdate``; raise ``ValueError`` if unusable."""
        raise NotImplementedError

    def client_weights(self, updates: list[ClientUpdate]) -> np.ndarray:
        """Weights of the mean: (K,) example shares by default, or (K, S) per segment."""
        return np.asarray(example_shares(updates))

    def segment_sizes(self) -> list[int]:
        """Sizes of the delta's segments that ``client_weights`` weights separately."""
        return [self.num_flat]

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        """The new global model from the valid updates (sorted by partition id): global +
        the combined deltas, norm-bounded (``strategies.aggregation``)."""
        deltas, clipped = clip_norms(
            [u.delta for u in updates if u.delta is not None], self.cfg.update_norm_bound
        )
        shortfall = robust_shortfall(self.cfg.aggregation, self.cfg.trim_fraction, len(deltas))
        if shortfall is not None:
            log(
                WARNING,
                "round %d: aggregation=%s: %s",
                server_round,
                self.cfg.aggregation,
                shortfall,
            )
            self.progress.traffic.round(server_round).aggregation_degraded = 1
        if len(deltas) != len(updates):
            raise RuntimeError(f"{type(self).__name__} decoded an update without a delta")
        combined = combine(
            deltas,
            self.client_weights(updates),
            self.segment_sizes(),
            self.cfg.aggregation,
            self.cfg.trim_fraction,
        )
        self.progress.traffic.round(server_round).clipped += clipped
        return self.apply_delta(combined)

    def apply_delta(self, delta: np.ndarray) -> list[np.ndarray]:
        """global + delta, back in the wire state's shapes (float32). The server's float32 model
        takes the change, never the lossy copy clients received: rounding it to the downlink's
        grid every round would erase every change below half a step."""
        flat = concat_flat(self.global_state, np.float64) + delta
        return [p.astype(np.float32) for p in split_flat(flat, self.shapes)]

    def clamp_variances(self, state: list[np.ndarray]) -> list[np.ndarray]:
        """Running variances floored at 0: quantized deltas (FedPAQ, QSGD, DAdaQuant) are
        unbiased but noisy, and one negative variance makes BatchNorm output NaN."""
        for i in self._variance_indices:
            state[i] = np.maximum(state[i], np.float32(0.0))
        return state

    def delta_of(self, state: list[np.ndarray], base: list[np.ndarray] | None = None) -> np.ndarray:
        """Flat float32 change of a wire state against ``base`` (default: what clients received
        this round, ``delta_base``; the global model outside a round)."""
        if base is None:
            base = self.global_state if self._delta_base is None else self._delta_base
        return concat_flat(state, np.float32) - concat_flat(base, np.float32)

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

    def count_metric(self, server_round: int, name: str) -> None:
        """Add one to method column ``name`` of a round (e.g. ``full_downlinks``)."""
        count = self.round_metrics.get(server_round, {}).get(name, 0)
        self.record_metrics(server_round, **{name: int(count) + 1})

    # ----------------------------------------------------------------- Flower Strategy API
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        if self.results is not None:
            # Before round 0 is written: a folder of another federation size stays as it was.
            check_federation_size(
                self.results.run_dir, self.cfg.as_dict(), client_manager.num_available()
            )
        return ndarrays_to_parameters(self.global_state)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        server_round += self.progress.round_offset
        self._round_started = time.perf_counter()
        clients = self.sample_clients(server_round, client_manager)
        self.begin_round(server_round, clients)
        traffic = self.progress.traffic.round(server_round)
        self._clients = self.round_clients(server_round)
        instructions = []
        for client in clients:
            payload = self.downlink_parameters(server_round, client.cid)
            config: dict[str, Scalar] = {ROUND: server_round}
            config.update(self.fit_config(server_round, client.cid))
            sent = parameters_nbytes(payload)
            traffic.downlink_bytes += sent
            traffic.downlink_messages += 1
            self._clients.sent[client.cid] = sent
            instructions.append((client, FitIns(payload, config)))
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        server_round += self.progress.round_offset
        self._delta_base = self.delta_base(server_round)
        try:
            return self._aggregate_round(server_round, results, failures)
        finally:
            self._delta_base = None

    def _aggregate_round(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        traffic = self.progress.traffic.round(server_round)
        traffic.failures += len(failures)
        for failure in failures:
            log(WARNING, "round %d: a client failed: %s", server_round, _describe_failure(failure))
        clients = self._clients
        if clients is None or clients.server_round != server_round:
            clients = self.round_clients(server_round)  # aggregate_fit without configure_fit
        link_seconds, late = clients.receive([(client.cid, res) for client, res in results])
        if self.link_profile is not None:
            traffic.link_seconds = link_seconds
        updates: list[ClientUpdate] = []
        for client, fit_res in results:
            traffic.uplink_bytes += parameters_nbytes(fit_res.parameters)
            traffic.uplink_messages += 1
            if client.cid in late:
                traffic.late += 1
                log(
                    WARNING,
                    "round %d: dropped client %s: its modelled reply comes after the "
                    "round-timeout of %g s",
                    server_round,
                    client.cid,
                    self.cfg.round_timeout,
                )
                continue
            try:
                updates.append(self.decode_uplink(server_round, client.cid, fit_res))
            except PayloadError as err:
                traffic.rejected += 1
                clients.mark(client.cid, "rejected")
                log(
                    WARNING,
                    "round %d: rejected payload of client %s: %s",
                    server_round,
                    client.cid,
                    err,
                )
        # A fixed order makes float sums, and so the whole run, independent of arrival order.
        updates.sort(key=lambda u: (u.partition_id, u.cid))
        kept = self._drop_implausible(server_round, updates)
        for dropped in {u.cid for u in updates} - {u.cid for u in kept}:
            clients.mark(dropped, "rejected")
        updates = kept
        self.end_round(server_round, list(clients.sent), {u.cid for u in updates})
        if self.results is not None:
            self.results.write_clients(clients.table())
        self._cap_examples(server_round, updates)
        minimum = self.cfg.min_fit_results
        if len(updates) >= minimum:
            candidate = self.clamp_variances(self.aggregate(server_round, updates))
            problem = aggregate_problem(candidate)
            if problem is None:
                self.global_state = candidate
            else:
                traffic.aggregate_refused += 1
                log(
                    WARNING,
                    "round %d: aggregate refused (%s); the global model stays as it was",
                    server_round,
                    problem,
                )
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
        val_loss, val_accuracy = math.nan, math.nan
        if self.validation_set is not None:
            val_loss, val_accuracy = evaluate_model(self.model, self.validation_set, self.device)
        self._record_round(
            server_round, loss, accuracy, val_loss=val_loss, val_accuracy=val_accuracy
        )
        metrics: dict[str, Scalar] = {"accuracy": accuracy}
        if self.validation_set is not None:
            metrics["val_accuracy"] = val_accuracy
        return loss, metrics

    # ----------------------------------------------------------------- the trust boundary
    def decode_uplink(self, server_round: int, cid: str, fit_res: FitRes) -> ClientUpdate:
        """A client's ``FitRes`` -> ``ClientUpdate``, or ``PayloadError`` saying why not.

        The fields every method relies on are checked here, the tensors deserialized once,
        anything the method's ``decode_update`` raises becomes a rejection of this message, and
        so does a decoded value that is not finite.
        """
        num_examples = fit_res.num_examples
        if isinstance(num_examples, bool) or not isinstance(num_examples, int):
            raise PayloadError(f"num_examples must be an int, got {num_examples!r}")
        if num_examples <= 0:
            raise PayloadError(f"num_examples must be positive, got {num_examples}")
        metrics = dict(fit_res.metrics)
        partition = metrics.get(PARTITION_ID)
        if not isinstance(partition, int) or isinstance(partition, bool) or partition < 0:
            raise PayloadError(f"metrics[{PARTITION_ID!r}] must be an int >= 0, got {partition!r}")
        known = self.partitions.get(cid, partition)
        if known != partition:
            raise PayloadError(f"client {cid} claims partition {partition}, earlier {known}")
        for name in (TRAIN_LOSS, TRAIN_SECONDS):
            value = metrics.get(name)
            if value is not None and not _finite_non_negative(value):
                raise PayloadError(f"metrics[{name!r}] must be a finite number >= 0, got {value!r}")
        threads = metrics.get(TORCH_THREADS)
        if threads is not None and not (
            isinstance(threads, int) and not isinstance(threads, bool) and 1 <= threads <= 4096
        ):
            raise PayloadError(
                f"metrics[{TORCH_THREADS!r}] must be an int in 1..4096, got {threads!r}"
            )
        tensors = fit_res.parameters.tensors
        if len(tensors) > self.max_uplink_arrays:  # counted before anything is decoded
            raise PayloadError(
                f"{self.uplink_name}: {len(tensors)} arrays, more than any message of this run "
                f"holds ({self.max_uplink_arrays})"
            )
        try:
            arrays = [exact_ndarray(tensor) for tensor in tensors]
        except Exception as err:  # np.load raises several types on garbage
            raise PayloadError(
                f"{self.uplink_name}: undecodable tensor: {type(err).__name__}: {err}"
            ) from None
        reply = ClientReply(cid, partition, num_examples, arrays, metrics)
        try:
            update = self.decode_update(server_round, reply)
        except PayloadError:
            raise
        except Exception as err:  # wrong sizes, dtypes or values: the codecs say which
            raise PayloadError(f"{self.uplink_name}: {err}") from None
        decoded = [*update.arrays, *([update.delta] if update.delta is not None else [])]
        if not all(np.all(np.isfinite(a)) for a in decoded):
            raise PayloadError(f"{self.uplink_name}: decodes to non-finite values")
        # No model here holds such values: an update that does is an attack or a broken device,
        # and norm clipping alone would still let it steer the round's direction.
        if any(a.size and float(np.abs(a).max()) > MAX_MAGNITUDE for a in decoded):
            raise PayloadError(f"{self.uplink_name}: decodes to values beyond {MAX_MAGNITUDE:g}")
        self.partitions.setdefault(cid, partition)
        if threads is not None:
            self.client_threads.add(threads)
        return update

    def _drop_implausible(
        self, server_round: int, updates: list[ClientUpdate]
    ) -> list[ClientUpdate]:
        """Reject the updates whose delta is ``update-norm-reject`` times longer than the
        round's lower median (``strategies.aggregation.implausible``)."""
        with_delta = [u for u in updates if u.delta is not None]
        flags = implausible([u.delta for u in with_delta], self.cfg.update_norm_reject)
        dropped = {id(u) for u, flag in zip(with_delta, flags, strict=True) if flag}
        for update in with_delta:
            if id(update) in dropped:
                log(
                    WARNING,
                    "round %d: rejected payload of client %s: update norm beyond %g x the "
                    "round's median",
                    server_round,
                    update.cid,
                    self.cfg.update_norm_reject,
                )
        self.progress.traffic.round(server_round).rejected += len(dropped)
        return [u for u in updates if id(u) not in dropped]

    def _known_sizes(self) -> list[int] | None:
        """The partitions' sizes for the number of clients seen, when the server can compute
        them (local data in simulation); computed once per number of clients."""
        count = self.progress.num_clients
        if self.partition_sizes is None or count < 1:
            return None
        if self._sizes is None or self._sizes[0] != count:
            try:
                sizes = self.partition_sizes(count)
            except Exception as err:  # e.g. data the server cannot read: fall back to medians
                log(WARNING, "partition sizes unknown (%s); example counts capped by median", err)
                sizes = None
            self._sizes = (count, sizes)
        return self._sizes[1]

    def _cap_examples(self, server_round: int, updates: list[ClientUpdate]) -> None:
        """Cap each claimed example count: ``max-examples``, else the claimed partition's size
        where known (a partition id the server does not know: the largest known size), else
        10 x the round's lower median claim, which no minority of the round's clients can
        raise; a capped claim is logged.

        Partition sizes are computed for as many partitions as nodes seen (simulation: one node
        per partition). A deployment with a node missing gets slightly wrong caps, which only
        shift weights; ``max-examples`` is the ceiling to set there.
        """
        if not updates:
            return
        sizes = self._known_sizes()
        median = lower_median([float(u.num_examples) for u in updates])
        for update in updates:
            if self.cfg.max_examples:
                cap = self.cfg.max_examples
            elif sizes:
                known = update.partition_id < len(sizes)
                cap = sizes[update.partition_id] if known else max(sizes)
            else:
                cap = max(1, int(10 * median))
            if update.num_examples > cap:
                log(
                    WARNING,
                    "round %d: client %s claims %d examples, counted as %d",
                    server_round,
                    update.cid,
                    update.num_examples,
                    cap,
                )
                update.num_examples = max(cap, 1)

    # ----------------------------------------------------------------- shared machinery
    def round_clients(self, server_round: int) -> RoundClients:
        """A round's per-client record under the run's link model (``strategies.link_timing``);
        with a link profile ``round-timeout`` is the modelled deadline."""
        deadline = self.cfg.round_timeout if self.link_profile is not None else 0.0
        return RoundClients(
            server_round, self.link_profile, self.cfg.seed, deadline, transport_of(self.cfg)
        )

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
        rng = numpy_rng(self.cfg.seed, server_round, SAMPLING_SALT)
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
            **summary(
                self.cfg,
                self.progress,
                self.num_scalars,
                str(self.device),
                self.torch_threads,
                self.client_threads,
            ),
            **self.summary_fields(),
        }

    def round_row(
        self,
        server_round: int,
        loss: float,
        accuracy: float,
        *,
        val_loss: float = math.nan,
        val_accuracy: float = math.nan,
    ) -> dict[str, Any]:
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
            val_accuracy=val_accuracy,
            val_loss=val_loss,
            link_seconds_total=self.link_seconds_total(server_round),
        )

    def link_seconds_total(self, server_round: int) -> float:
        """Modelled seconds of rounds 1..``server_round`` (NaN without a link profile)."""
        if self.link_profile is None:
            return math.nan
        ledger = self.progress.traffic
        return float(sum(t.link_seconds for r, t in ledger.items() if 0 < r <= server_round))

    def _record_round(
        self,
        server_round: int,
        loss: float,
        accuracy: float,
        *,
        val_loss: float = math.nan,
        val_accuracy: float = math.nan,
    ) -> None:
        row = self.round_row(
            server_round, loss, accuracy, val_loss=val_loss, val_accuracy=val_accuracy
        )
        self.progress.history.append(row)
        log_round(self.cfg.strategy, self.cfg.num_server_rounds, row)
        if self.results is not None:
            self.results.write_round(row)
            self.results.write_summary(self.summary())
            if self.cfg.checkpoint:
                self.save_checkpoint(server_round)
            if row["round"] >= self.cfg.num_server_rounds:
                self._plot_run()

    def _plot_run(self) -> None:
        """``curves.png`` beside ``rounds.csv`` once the last round is in; a failed plot is a
        warning, never a failed run."""
        assert self.results is not None
        path = self.results.run_dir / PLOT_NAME
        title = f"{self.cfg.strategy} on {self.cfg.dataset} ({self.results.run_dir.name})"
        try:
            plot_run(self.progress.history, path, title)
        except Exception as err:  # noqa: BLE001 - matplotlib problems must not fail a run
            log(WARNING, "could not draw %s: %s", path, err)
            return
        log(INFO, "curves: %s", path)

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

    @property
    def max_uplink_arrays(self) -> int:
        """The most arrays an uplink of this run may hold: a full wire state (FedAvg's), plus a
        few for headers and scales; more is refused before any array is decoded."""
        return len(self.global_state) + 8

    def key_defaults(self) -> dict[str, Any]:
        """Defaults of the common keys and this method's: what a key missing from an older
        run's stored config stood for."""
        keys = (*RunConfig.config_keys(), *type(self.settings).config_keys())
        return {**{key.name: key.default for key in keys}, **LEGACY_VALUES}

    def migrated_history(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A checkpoint's ``rounds.csv`` rows with every column of this version: one an older
        version did not write is "not recorded" (its method default, else NaN)."""
        columns = self.results.columns if self.results is not None else ()
        migrated = []
        for row in rows:  # rows are mappings with a round (``RunProgress.from_meta`` checked)
            filled = {c: self.round_columns.get(c, math.nan) for c in columns if c not in row}
            migrated.append({**row, **filled})
        return migrated

    def restore(self, path: Path) -> int:
        """Load a checkpoint; returns the number of rounds already done (the round offset).

        Everything is read and checked (model, progress, method state; rows of an older version
        given the columns it lacked) before the results folder is touched: a refused checkpoint
        leaves ``rounds.csv`` as it was, with one line saying why (``ConfigError``)."""
        try:
            restored = load_run(path, self.cfg, self.global_state, self.key_defaults())
            self.load_method_state(restored.method_arrays, restored.method_meta)
            history = self.migrated_history(restored.progress.history)
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"resume-from {path}: {err}") from None
        self.global_state = restored.global_state
        self.progress = restored.progress
        self.progress.history = history
        self.round_memo.clear()
        if self.results is not None:
            self.results.rewrite_rounds(self.progress.history)
            self.results.write_summary(self.summary())
        log(INFO, "resumed from %s after round %d", path, restored.round)
        return restored.round


def exact_ndarray(tensor: bytes) -> np.ndarray:
    """One serialized array (``.npy`` bytes, as Flower sends them), refused unless the bytes
    hold exactly it: no pickled objects, nothing missing and nothing after the data (trailing
    bytes would be counted as uplink and inflate a run's bpp)."""
    buffer = io.BytesIO(tensor)
    array = np.lib.format.read_array(buffer, allow_pickle=False)
    extra = len(tensor) - buffer.tell()
    if extra:
        raise ValueError(f"{extra} bytes after the array's data")
    return array


def _finite_non_negative(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _cid_sort_key(cid: str) -> tuple[int, str]:
    return (int(cid), cid) if cid.isdigit() else (0, cid)


def _describe_failure(failure: tuple[ClientProxy, FitRes] | BaseException) -> str:
    if isinstance(failure, BaseException):
        return f"{type(failure).__name__}: {failure}"
    client, res = failure
    return f"client {client.cid}: status {res.status.code.name}: {res.status.message}"
