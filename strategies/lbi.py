"""LBI-FL server (Algorithm 1, lines 4-6): dequantize, average, re-quantize per client width.

Clients upload their Conv2d/Linear weights at their own weight width k_w (packed codes plus one
scale per output channel, ``compression.lbi_codec``); the server dequantizes, averages the
clients' changes from what each was sent (example-weighted; the change against the model a client
received, so the downlink's rounding error never accumulates in the server's float model), and
sends each client the new global model quantized at the width that client
will train at next (``lbi-next-weight-bits`` of its last message; INT4 before its first, INT8 in
``ui8``), so INT4 clients cost ~4 bpp both ways. In ``fp32`` mode weights travel as fp32.

Downlink rounding is ``lbi-wire-rounding`` (stochastic by default: unbiased, so the averaged
updates that are smaller than half a 4-bit step survive re-quantization in expectation), seeded
per (seed, round, width); every client of one width gets the same message. The server evaluates
the model a client receives at the most common downlink width of the round.

Per round, ``rounds.csv`` gains the training BitOPs of the round and the mean widths, and
``lbi_clients.csv`` one row per client (widths, BitOPs, Eq. 5 losses, the policy's action);
``summary.json`` gains ``bitops``, ``bitops_int8`` and ``bitops_reduction_vs_int8``.
Contract: ``contracts.lbi``.
"""

from __future__ import annotations

import csv
from collections import Counter
from typing import Any

import numpy as np
from flwr.common import Scalar

from compression import lbi_codec, reference
from compression.float_codec import FloatStateCodec
from compression.lowbit import KINDS
from contracts import lbi
from contracts.lbi import LBISettings
from core.seeding import torch_generator
from core.wire_state import quantized_split
from strategies.aggregation import gather_flat, place_flat
from strategies.base import ClientReply, ClientUpdate, CommunicationStrategy, PayloadError

#: salt of the downlink rounding seed.
DOWNLINK_SALT = 0xD0B
CLIENTS_FILE = "lbi_clients.csv"
CLIENT_COLUMNS = (
    "round",
    "partition_id",
    "weight_bits",
    "activation_bits",
    "gradient_bits",
    "next_weight_bits",
    "action",
    "bitops",
    "weight_loss",
    "activation_loss",
    "gradient_loss",
)


class LBIStrategy(CommunicationStrategy):
    """Server side of LBI-FL; see the module docstring."""

    generic_downlink = False  # the paper's own compressed downlink
    entropy_codes = True
    uplink_reference_codes = True  # weight codes against the codes it sent the client

    uplink_name = "LBI-FL uplink"
    round_columns = {
        "bitops": 0.0,
        "bitops_int8": 0.0,
        "mean_weight_bits": float("nan"),
        "mean_activation_bits": float("nan"),
        "mean_gradient_bits": float("nan"),
    }
    settings: LBISettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.q_index, self.e_index, self.split = quantized_split(self.model)
        self.codec = lbi.weight_codec(
            self.settings, self.model, self.cfg.entropy, self.cfg.uplink_reference
        )
        self.float_codec = FloatStateCodec([a.shape for a in self.global_state])
        self.initial_bits = self.settings.initial_widths.weight
        self.client_bits: dict[str, int] = {}  # cid -> weight width of its next downlink
        # cid -> (round, the wire state it received, dequantized): updates are taken against it.
        self._sent: dict[str, tuple[int, list[np.ndarray]]] = {}
        #: cid -> (width, unsigned codes) it was sent this round (``lbi-uplink-reference``).
        self._sent_codes: dict[str, tuple[int, np.ndarray]] = {}
        self._clients_file_started = False
        self.total_bitops = 0.0
        self.total_bitops_int8 = 0.0

    # --------------------------------------------------------------- downlink
    def message(self, server_round: int, bits: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(wire arrays, dequantized wire state) of the global model at ``bits``; once per round."""
        return self.round_memo.get(
            server_round, ("message", bits), lambda: self._quantize(server_round, bits)
        )

    def _quantize(self, server_round: int, bits: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        generator = torch_generator(self.cfg.seed, server_round, bits, DOWNLINK_SALT)
        codes, scales = lbi_codec.quantize_weights(
            [self.global_state[i] for i in self.q_index],
            bits,
            self.settings.wire_rounding,
            generator,
            per_channel=self.codec.per_channel,
        )
        extras = gather_flat(self.global_state, self.e_index, self.settings.extras_dtype)
        arrays = self.codec.encode(lbi_codec.WeightMessage(bits, codes, scales, extras))
        decoded = self.codec.decode(arrays)
        received = [array.copy() for array in self.global_state]
        weights = lbi_codec.dequantize(decoded, self.split)
        for index, tensor in zip(self.q_index, weights, strict=True):
            received[index] = tensor
        place_flat(received, self.e_index, decoded.extras, self.split.extra_shapes)
        return arrays, received

    def downlink_arrays(self, server_round: int, cid: str) -> list[np.ndarray]:
        if not self.settings.quantized_wire:
            self._sent[cid] = (server_round, self.global_state)
            return self.global_state
        bits = self.client_bits.get(cid, self.initial_bits)
        arrays, received = self.message(server_round, bits)
        self._sent[cid] = (server_round, received)
        if self.codec.reference:
            codes = self.round_memo.get(
                server_round,
                ("sent-codes", bits),
                lambda: lbi_codec.unsigned_codes(self.codec.decode(arrays).codes, bits),
            )
            self._sent_codes[cid] = (bits, codes)
        return arrays

    def evaluation_state(self, server_round: int) -> list[np.ndarray]:
        """The next round's message at the most common client width, dequantized: exactly what
        those clients will start from (same seed, so the same message is then sent)."""
        if not self.settings.quantized_wire:
            return self.global_state
        widths = Counter(self.client_bits.values())
        bits = widths.most_common(1)[0][0] if widths else self.initial_bits
        return self.message(server_round + 1, bits)[1]

    # --------------------------------------------------------------- uplink and aggregation
    def decode_update(self, server_round: int, reply: ClientReply) -> ClientUpdate:
        """The client's change from the model it received (as it received it); its metrics
        checked first: widths the run's mode can produce, finite non-negative BitOPs and Eq. 5
        losses, a known action."""
        metrics = reply.metrics
        widths = {name: _metric_bits(metrics, name) for name in lbi.WIDTH_METRICS}
        for name, value in widths.items():
            allowed = self.settings.reportable_widths(name)
            if value not in allowed:
                raise ValueError(
                    f"metrics[{name!r}] = {value} is not a width of mode "
                    f"{self.settings.mode!r} ({sorted(allowed)})"
                )
        for name in (lbi.BITOPS, lbi.BITOPS_INT8, *(lbi.loss_metric(k) for k in KINDS)):
            value = metrics.get(name, 0.0)
            if not isinstance(value, float | int) or isinstance(value, bool):
                raise ValueError(f"metrics[{name!r}] must be a non-negative number")
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"metrics[{name!r}] must be a non-negative number")
        action = metrics.get(lbi.ACTION, -1)
        if isinstance(action, bool) or action not in (-1, 0, 1, 2, 3):
            raise ValueError(f"metrics[{lbi.ACTION!r}] must be -1..3, got {action!r}")
        sent_round, sent = self._sent.get(reply.cid, (None, []))
        if sent_round != server_round:
            raise ValueError(f"no round-{server_round} model was sent to client {reply.cid}")
        if self.settings.quantized_wire:
            held = None
            if reply.cid in self._sent_codes:
                held = reference.Basis(server_round, self._sent_codes[reply.cid][1])
            message = self.codec.decode_with(reply.arrays, held)
            if message.bits != widths[lbi.WEIGHT_BITS]:
                raise ValueError(
                    f"payload is {message.bits}-bit but the client reported "
                    f"{widths[lbi.WEIGHT_BITS]}-bit weights"
                )
            state = [array.copy() for array in sent]
            weights = lbi_codec.dequantize(message, self.split)
            for index, tensor in zip(self.q_index, weights, strict=True):
                state[index] = tensor
            place_flat(state, self.e_index, message.extras, self.split.extra_shapes)
        else:
            state = self.float_codec.decode(reply.arrays)
        update = reply.update([])
        update.delta = self.delta_of(state, base=sent)
        return update

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        self._record_clients(server_round, updates)
        return super().aggregate(server_round, updates)

    def _record_clients(self, server_round: int, updates: list[ClientUpdate]) -> None:
        """Next widths, per-round BitOPs and widths, and the per-client rows of the round."""
        rows = []
        for update in updates:
            m = update.metrics
            self.client_bits[update.cid] = int(m[lbi.NEXT_WEIGHT_BITS])
            rows.append(
                {
                    "round": server_round,
                    "partition_id": update.partition_id,
                    "weight_bits": m[lbi.WEIGHT_BITS],
                    "activation_bits": m[lbi.ACTIVATION_BITS],
                    "gradient_bits": m[lbi.GRADIENT_BITS],
                    "next_weight_bits": m[lbi.NEXT_WEIGHT_BITS],
                    "action": m.get(lbi.ACTION, -1),
                    "bitops": m[lbi.BITOPS],
                    **{
                        f"{kind}_loss": m.get(lbi.loss_metric(kind), float("nan")) for kind in KINDS
                    },
                }
            )
        bitops = float(sum(float(u.metrics[lbi.BITOPS]) for u in updates))
        bitops_int8 = float(sum(float(u.metrics[lbi.BITOPS_INT8]) for u in updates))
        self.total_bitops += bitops
        self.total_bitops_int8 += bitops_int8
        self.record_metrics(
            server_round,
            bitops=bitops,
            bitops_int8=bitops_int8,
            **{
                f"mean_{kind}_bits": float(np.mean([r[f"{kind}_bits"] for r in rows]))
                for kind in KINDS
            },
        )
        self._write_client_rows(rows)

    def _write_client_rows(self, rows: list[dict[str, Any]]) -> None:
        """Append the round's rows to ``lbi_clients.csv``; the first write of a process starts
        the file afresh, keeping only the rounds a resumed run already completed."""
        if self.results is None:
            return
        path = self.results.run_dir / CLIENTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self._clients_file_started:
            kept: list[dict[str, str]] = []
            if self.round_offset and path.exists():
                with path.open(newline="") as handle:
                    kept = [
                        r for r in csv.DictReader(handle) if int(r["round"]) <= self.round_offset
                    ]
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=CLIENT_COLUMNS)
                writer.writeheader()
                writer.writerows(kept)
            self._clients_file_started = True
        with path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=CLIENT_COLUMNS).writerows(rows)

    # --------------------------------------------------------------- results and checkpoints
    def summary_fields(self) -> dict[str, Any]:
        return {
            "bitops": self.total_bitops,
            "bitops_int8": self.total_bitops_int8,
            "bitops_reduction_vs_int8": (
                1.0 - self.total_bitops / self.total_bitops_int8 if self.total_bitops_int8 else None
            ),
        }

    def method_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {}, {
            "client_bits": dict(self.client_bits),
            "total_bitops": self.total_bitops,
            "total_bitops_int8": self.total_bitops_int8,
        }

    def load_method_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        bits = {str(k): int(v) for k, v in meta.get("client_bits", {}).items()}
        allowed = self.settings.reportable_widths(lbi.NEXT_WEIGHT_BITS)
        if any(b not in allowed for b in bits.values()):
            raise ValueError(
                f"LBI-FL client widths {sorted(set(bits.values()))} not in {sorted(allowed)}"
            )
        totals = [float(meta.get(k, 0.0)) for k in ("total_bitops", "total_bitops_int8")]
        if not all(np.isfinite(t) and t >= 0 for t in totals):
            raise ValueError("LBI-FL's BitOPs totals must be finite and >= 0")
        self.client_bits = bits
        self.total_bitops, self.total_bitops_int8 = totals


def _metric_bits(metrics: dict[str, Scalar], name: str) -> int:
    value = metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"metrics[{name!r}] must be an int, got {value!r}")
    return value


__all__ = ["CLIENTS_FILE", "LBIStrategy", "PayloadError"]
