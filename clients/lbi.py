"""LBI-FL client (Algorithm 1): low-bit local training at bit-widths the client keeps and adapts.

Every Conv2d/Linear layer of the local model trains through ``compression.lowbit``: weights and
activations quantized in the forward pass, each layer's output gradient stochastically quantized
in the backward pass, at this client's widths (k_w, k_a, k_g). The widths live in the node's
``context.state`` and change only by the run's ``lbi-mode``:

* ``fp32`` / ``ui4`` / ``ui8``: fixed (no quantization / INT4 / INT8 everywhere);
* ``agent`` (default): start at INT4; from round ``lbi-start``, every ``lbi-interval`` rounds the
  pre-trained DQN agent (``clients.lbi_agent``) looks at the state of Section 4.3 (time step =
  round / rounds, widths, this round's Eq. 5 quantization losses, last change steps) and keeps
  the widths or raises one of them by 2 (never above 8, never down);
* ``random``: the same schedule, with a seeded uniform draw among the valid actions (the paper's
  random-allocation ablation).

The decision is taken after the round's training, so the upload uses the width the weights were
trained at and the server learns the next downlink width from ``lbi-next-weight-bits``.

Wire: weights at k_w bits both ways (``compression.lbi_codec``; fp32 wire state in ``fp32``
mode). Metrics report the widths, the Eq. 5 losses and the round's training BitOPs (samples seen x
per-sample BitOPs of the quantized layers) with the INT8 figure for the same work.
Contract: ``contracts.lbi``.
"""

from __future__ import annotations

from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common import ConfigRecord, NDArrays, Scalar
from flwr.common.logger import log

from clients.base import TrainingClient
from clients.lbi_agent import (
    DEFAULT_AGENT_PATH,
    BitWidthAgent,
    apply_action,
    build_state,
    provenance_problem,
    valid_actions,
)
from compression import lbi_codec, reference
from compression.int8_matmul import int8_mode
from compression.layout import concat_flat, split_flat
from compression.lowbit import (
    INT8,
    KINDS,
    BitWidths,
    convert_to_lowbit,
    layer_macs,
    quantization_losses,
    reset_statistics,
    set_bit_widths,
    training_bitops,
)
from contracts import lbi
from contracts.lbi import LBISettings
from contracts.messages import ROUND
from core.seeding import numpy_rng, torch_generator
from core.wire_state import quantized_split, set_wire_state, wire_keys

STATE_KEY = "lbi"
#: salts so the uplink rounding and the random policy draw streams apart from training's.
UPLINK_SALT = 0x1B1
RANDOM_POLICY_SALT = 0x1B2

_AGENTS: dict[str, BitWidthAgent] = {}


def load_agent(path: str) -> BitWidthAgent:
    """The agent of ``path`` ('' = the shipped one), loaded once per process."""
    resolved = str(Path(path) if path else DEFAULT_AGENT_PATH)
    if resolved not in _AGENTS:
        agent = BitWidthAgent.load(resolved)
        problem = provenance_problem(agent)
        if problem:
            log(WARNING, "LBI-FL agent %s is stale: %s", resolved, problem)
        _AGENTS[resolved] = agent
    return _AGENTS[resolved]


class LBIClient(TrainingClient):
    """Low-bit training client; see the module docstring."""

    settings: LBISettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mode = self.settings.mode
        self.q_index, self.e_index, self.split = quantized_split(self.model)
        keys = wire_keys(self.model)
        self.q_keys = [keys[i] for i in self.q_index]
        self.e_keys = [keys[i] for i in self.e_index]
        self.codec = lbi.weight_codec(
            self.settings, self.model, self.cfg.entropy, self.cfg.uplink_reference
        )
        convert_to_lowbit(
            self.model,
            self.settings.layers,
            self.settings.scale_interval,
            widen=self.settings.scale_widening,
            per_channel=self.settings.weight_scale == "channel",
        )
        #: (width, scales, unsigned codes, round) of the message received this round.
        self.received_grid: tuple[int, np.ndarray, np.ndarray, int] | None = None
        self.input_shape = tuple(self.train_set.tensors[0].shape[1:])
        self.macs = sum(layer_macs(self.model, self.input_shape).values())
        self._load_state()

    # ----------------------------------------------------------------- per-node state
    def _load_state(self) -> None:
        record = self.context.state.get(STATE_KEY)
        initial = self.settings.initial_widths
        if isinstance(record, ConfigRecord) and record.get("mode") == self.mode:
            self.widths = BitWidths(*(int(record[f"{kind}-bits"]) for kind in KINDS))
            self.last_change = {kind: float(record[f"{kind}-changed"]) for kind in KINDS}
            self.last_decision = int(record["decided-round"])
        else:
            self.widths = initial
            self.last_change = dict.fromkeys(KINDS, -1.0)
            self.last_decision = -(10**9)

    def _save_state(self) -> None:
        values: dict[str, Scalar] = {"mode": self.mode, "decided-round": self.last_decision}
        for kind in KINDS:
            values[f"{kind}-bits"] = self.widths.get(kind)
            values[f"{kind}-changed"] = self.last_change[kind]
        self.context.state[STATE_KEY] = ConfigRecord(values)

    # ----------------------------------------------------------------- wire
    def load_downlink(self, arrays: NDArrays, config: dict[str, Scalar]) -> None:
        if not self.settings.quantized_wire:
            set_wire_state(self.model, arrays)
            return
        message = self.codec.decode(arrays)
        self.received_grid = (
            message.bits,
            message.scales,
            lbi_codec.unsigned_codes(message.codes, message.bits),
            int(config.get(ROUND, 0)),
        )
        weights = lbi_codec.dequantize(message, self.split)
        extras = split_flat(message.extras, self.split.extra_shapes)
        state = self.model.state_dict()
        with torch.no_grad():
            for key, array in zip(self.q_keys + self.e_keys, weights + extras, strict=True):
                state[key].copy_(torch.from_numpy(np.ascontiguousarray(array)))

    def encode_uplink(self, config: dict[str, Scalar]) -> NDArrays:
        if not self.settings.quantized_wire:
            return super().encode_uplink(config)
        state = self.model.state_dict()
        generator = torch_generator(
            self.cfg.seed, self.partition_id, int(config.get(ROUND, 0)), UPLINK_SALT
        )
        bits = self.widths.weight
        same_grid = self.received_grid is not None and self.received_grid[0] == bits
        codes, scales = lbi_codec.quantize_weights(
            [state[k].detach().cpu().numpy() for k in self.q_keys],
            bits,
            self.settings.wire_rounding,
            generator,
            grid_scales=self.received_grid[1] if same_grid else None,
            per_channel=self.codec.per_channel,
        )
        extras = concat_flat(
            [state[k].detach().cpu().numpy() for k in self.e_keys], self.settings.extras_dtype
        )
        basis = None
        if self.codec.reference and same_grid and self.received_grid is not None:
            _, _, received_codes, received_round = self.received_grid
            if received_round >= 1:
                basis = reference.Basis(received_round, received_codes)
        return self.codec.encode(lbi_codec.WeightMessage(bits, codes, scales, extras, basis))

    # ----------------------------------------------------------------- training and decisions
    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        server_round = int(config.get(ROUND, 0))
        trained_at = self.widths
        set_bit_widths(self.model, trained_at)
        reset_statistics(self.model)
        with int8_mode(self.settings.int8_kernels):
            payload, num_examples, metrics = super().fit(parameters, config)
        losses = quantization_losses(self.model)
        samples = self.cfg.local_epochs * len(self.train_set)
        action = self.decide(server_round, losses)
        self._save_state()
        metrics.update(
            {
                **{lbi.width_metric(kind): trained_at.get(kind) for kind in KINDS},
                lbi.NEXT_WEIGHT_BITS: self.widths.weight,
                lbi.ACTION: action,
                lbi.BITOPS: float(samples * training_bitops(self.macs, trained_at)),
                lbi.BITOPS_INT8: float(samples * training_bitops(self.macs, INT8)),
                **{lbi.loss_metric(kind): losses[kind] for kind in KINDS},
            }
        )
        return payload, num_examples, metrics

    def decide(self, server_round: int, losses: dict[str, float]) -> int:
        """Consult the policy if this round is a decision round; returns the action (-1: none).

        A client decides when ``lbi-interval`` rounds have passed since its last decision (so a
        client that missed a round under partial participation decides at its next one).
        """
        if self.mode not in ("agent", "random") or server_round < self.settings.start:
            return -1
        if server_round - self.last_decision < self.settings.interval:
            return -1
        time_step = min(server_round / max(self.cfg.num_server_rounds, 1), 1.0)
        if self.mode == "agent":
            state = build_state(time_step, self.widths, losses, self.last_change)
            action = load_agent(self.settings.agent_file).act(state, self.widths)
        else:
            rng = numpy_rng(self.cfg.seed, self.partition_id, server_round, RANDOM_POLICY_SALT)
            action = int(rng.choice(np.flatnonzero(valid_actions(self.widths))))
        self.last_decision = server_round
        new_widths = apply_action(self.widths, action)
        for kind in KINDS:
            if new_widths.get(kind) != self.widths.get(kind):
                self.last_change[kind] = time_step
        self.widths = new_widths
        return action


__all__ = ["LBIClient", "load_agent"]
