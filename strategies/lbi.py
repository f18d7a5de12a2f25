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
"""

from __future__ import annotations

import csv
from collections import Counter
from typing import Any

import numpy as np
import torch
from flwr.common import FitRes, Scalar, parameters_to_ndarrays

from clients.lbi import INITIAL_WIDTHS, MODES
from compression import lbi_codec
from compression.layout import concat_flat
from compression.lowbit import KINDS, LAYER_CHOICES
from fl_app.config import ConfigKey, RunConfig
from fl_app.torch_utils import quantized_split
from strategies.base import (
    ClientUpdate,
    CommunicationStrategy,
    PayloadError,
    decode_float_arrays,
    place_flat,
)

CONFIG_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey("lbi-mode", str, "agent", "bit-width policy", choices=MODES),
    ConfigKey("lbi-start", int, 10, "first round the policy may change widths", min=1),
    ConfigKey("lbi-interval", int, 5, "rounds between two decisions of a client", min=1),
    ConfigKey("lbi-layers", str, "conv-linear", "layers trained in low bit", choices=LAYER_CHOICES),
    ConfigKey(
        "lbi-scale-interval",
        int,
        100,
        "training steps between weight/activation scale updates",
        min=1,
    ),
    ConfigKey(
        "lbi-wire-rounding",
        str,
        "stochastic",
        "rounding of weights on the wire (both ways)",
        choices=lbi_codec.ROUNDINGS,
    ),
    ConfigKey(
        "lbi-extras-dtype",
        str,
        "float16",
        "dtype of biases/BatchNorm on the wire",
        choices=lbi_codec.EXTRAS_DTYPES,
    ),
    ConfigKey("lbi-agent-file", str, "", "agent JSON ('' = the shipped clients/lbi_agent.json)"),
)

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
_WIDTH_METRICS = tuple(f"lbi-{kind}-bits" for kind in KINDS) + ("lbi-next-weight-bits",)


class LBIStrategy(CommunicationStrategy):
    """Server side of LBI-FL; see the module docstring."""

    extra_columns = (
        "bitops",
        "bitops_int8",
        "mean_weight_bits",
        "mean_activation_bits",
        "mean_gradient_bits",
    )

    def __init__(self, cfg: RunConfig, **kwargs) -> None:  # noqa: ANN003
        super().__init__(cfg, **kwargs)
        self.mode = str(cfg["lbi-mode"])
        self.quantized_wire = self.mode != "fp32"
        self.q_index, self.e_index, self.split = quantized_split(self.model)
        self.extras_dtype = str(cfg["lbi-extras-dtype"])
        self.initial_bits = INITIAL_WIDTHS[self.mode].weight
        self.client_bits: dict[str, int] = {}  # cid -> weight width of its next downlink
        self._messages: dict[tuple[int, int], tuple[list[np.ndarray], list[np.ndarray]]] = {}
        # cid -> (round, the wire state it received, dequantized): updates are taken against it.
        self._sent: dict[str, tuple[int, list[np.ndarray]]] = {}
        self._next_round = 1
        self._clients_file_started = False
        self.round_metrics: dict[int, dict[str, float]] = {}
        self.total_bitops = 0.0
        self.total_bitops_int8 = 0.0

    # --------------------------------------------------------------- downlink
    def _message(self, server_round: int, bits: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """(wire arrays, dequantized wire state) of the global model at ``bits``; once per round."""
        key = (server_round, bits)
        if key not in self._messages:
            self._messages = {k: v for k, v in self._messages.items() if k[0] == server_round}
            generator = torch.Generator().manual_seed(
                self.cfg.seed * 1_000_003 + server_round * 97 + bits * 7 + DOWNLINK_SALT
            )
            codes, scales = lbi_codec.quantize_weights(
                [self.global_state[i] for i in self.q_index],
                bits,
                str(self.cfg["lbi-wire-rounding"]),
                generator,
            )
            extras = concat_flat([self.global_state[i] for i in self.e_index], self.extras_dtype)
            arrays = lbi_codec.encode(self.split, codes, scales, extras, bits)
            decoded = lbi_codec.decode(arrays, self.split)
            received = [array.copy() for array in self.global_state]
            for index, tensor in zip(self.q_index, decoded.weights, strict=True):
                received[index] = tensor
            place_flat(received, self.e_index, decoded.extras, self.split.extra_shapes)
            self._messages[key] = (arrays, received)
        return self._messages[key]

    def downlink_arrays(self, server_round: int, cid: str) -> list[np.ndarray]:
        if not self.quantized_wire:
            self._sent[cid] = (server_round, self.global_state)
            return self.global_state
        arrays, received = self._message(server_round, self.client_bits.get(cid, self.initial_bits))
        self._sent[cid] = (server_round, received)
        return arrays

    def evaluation_state(self) -> list[np.ndarray]:
        """The next round's message at the most common client width, dequantized: exactly what
        those clients will start from (same seed, so the same message is then sent)."""
        if not self.quantized_wire:
            return self.global_state
        widths = Counter(self.client_bits.values())
        bits = widths.most_common(1)[0][0] if widths else self.initial_bits
        return self._message(self._next_round, bits)[1]

    # --------------------------------------------------------------- uplink and aggregation
    def decode_uplink(self, server_round: int, cid: str, fit_res: FitRes) -> ClientUpdate:
        metrics = fit_res.metrics
        try:
            widths = {name: _metric_bits(metrics, name) for name in _WIDTH_METRICS}
            for name in ("bitops", "bitops-int8"):
                value = metrics.get(name)
                if not isinstance(value, float | int) or not np.isfinite(value) or value < 0:
                    raise ValueError(f"metrics[{name!r}] must be a non-negative number")
            sent_round, sent = self._sent.get(cid, (None, []))
            if sent_round != server_round:
                raise ValueError(f"no round-{server_round} model was sent to client {cid}")
            if self.quantized_wire:
                message = lbi_codec.decode(parameters_to_ndarrays(fit_res.parameters), self.split)
                if message.bits != widths["lbi-weight-bits"]:
                    raise ValueError(
                        f"payload is {message.bits}-bit but the client reported "
                        f"{widths['lbi-weight-bits']}-bit weights"
                    )
                weights, extras = message.weights, message.extras
            else:
                floats = decode_float_arrays(fit_res, self.global_state)
                weights = [floats[i] for i in self.q_index]
                extras = concat_flat([floats[i] for i in self.e_index], np.float32)
            # The client's change from the model it received (as it received it).
            arrays = [w - sent[i] for w, i in zip(weights, self.q_index, strict=True)]
            arrays.append(extras - concat_flat([sent[i] for i in self.e_index], np.float32))
        except PayloadError as err:
            raise PayloadError(f"LBI-FL uplink: {err}") from None
        except Exception as err:  # garbage bytes, sizes, dtypes, widths
            raise PayloadError(f"LBI-FL uplink: {err}") from None
        return ClientUpdate.of(cid, fit_res, arrays)

    def aggregate(self, server_round: int, updates: list[ClientUpdate]) -> list[np.ndarray]:
        examples = np.array([u.num_examples for u in updates], dtype=np.float64)
        shares = examples / examples.sum()
        new_state = [array.copy() for array in self.global_state]
        layers = len(self.q_index)
        for layer, index in enumerate(self.q_index):
            mean = np.zeros(new_state[index].shape, dtype=np.float64)
            for share, update in zip(shares, updates, strict=True):
                mean += share * update.arrays[layer]
            new_state[index] = (new_state[index] + mean).astype(np.float32)
        extras = concat_flat([self.global_state[i] for i in self.e_index], np.float64)
        for share, update in zip(shares, updates, strict=True):
            extras += share * update.arrays[layers]
        place_flat(new_state, self.e_index, extras, self.split.extra_shapes)
        self._record_clients(server_round, updates)
        self._next_round = server_round + 1
        return new_state

    def _record_clients(self, server_round: int, updates: list[ClientUpdate]) -> None:
        """Next widths, per-round BitOPs and widths, and the per-client rows of the round."""
        rows = []
        for update in updates:
            m = update.metrics
            self.client_bits[update.cid] = int(m["lbi-next-weight-bits"])
            rows.append(
                {
                    "round": server_round,
                    "partition_id": update.partition_id,
                    "weight_bits": m["lbi-weight-bits"],
                    "activation_bits": m["lbi-activation-bits"],
                    "gradient_bits": m["lbi-gradient-bits"],
                    "next_weight_bits": m["lbi-next-weight-bits"],
                    "action": m.get("lbi-action", -1),
                    "bitops": m["bitops"],
                    "weight_loss": m.get("lbi-loss-weight", float("nan")),
                    "activation_loss": m.get("lbi-loss-activation", float("nan")),
                    "gradient_loss": m.get("lbi-loss-gradient", float("nan")),
                }
            )
        bitops = float(sum(float(u.metrics["bitops"]) for u in updates))
        bitops_int8 = float(sum(float(u.metrics["bitops-int8"]) for u in updates))
        self.total_bitops += bitops
        self.total_bitops_int8 += bitops_int8
        self.round_metrics[server_round] = {
            "bitops": bitops,
            "bitops_int8": bitops_int8,
            **{
                f"mean_{kind}_bits": float(np.mean([r[f"{kind}_bits"] for r in rows]))
                for kind in KINDS
            },
        }
        self._write_client_rows(rows)

    def _write_client_rows(self, rows: list[dict[str, Any]]) -> None:
        """Append the round's rows to ``lbi_clients.csv``; the first write of a process starts
        the file afresh, keeping only the rounds a resumed run already completed."""
        if self.results is None:
            return
        path = self.results.run_dir / CLIENTS_FILE
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
    def round_row(self, server_round: int, loss: float, accuracy: float) -> dict:
        row = super().round_row(server_round, loss, accuracy)
        empty = {column: float("nan") for column in self.extra_columns}
        empty.update({"bitops": 0.0, "bitops_int8": 0.0})
        row.update(self.round_metrics.get(server_round, empty))
        return row

    def summary(self) -> dict[str, Any]:
        result = super().summary()
        result["bitops"] = self.total_bitops
        result["bitops_int8"] = self.total_bitops_int8
        result["bitops_reduction_vs_int8"] = (
            1.0 - self.total_bitops / self.total_bitops_int8 if self.total_bitops_int8 else None
        )
        return result

    def method_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {}, {
            "client_bits": dict(self.client_bits),
            "total_bitops": self.total_bitops,
            "total_bitops_int8": self.total_bitops_int8,
        }

    def load_method_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self.client_bits = {str(k): int(v) for k, v in meta.get("client_bits", {}).items()}
        self.total_bitops = float(meta.get("total_bitops", 0.0))
        self.total_bitops_int8 = float(meta.get("total_bitops_int8", 0.0))


def _metric_bits(metrics: dict[str, Scalar], name: str) -> int:
    value = metrics.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"metrics[{name!r}] must be an int, got {value!r}")
    if not (lbi_codec.MIN_BITS <= value <= 16 or value == 32):
        raise ValueError(f"metrics[{name!r}] = {value} is not a bit-width")
    return value
