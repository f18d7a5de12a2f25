"""Clipped-uniform-quantization client: train, then send B-bit codes, clips and per-layer SQE.

Local training is plain SGD on float weights, or, with ``cuq-qat``, quantization-aware: every
Conv2d/Linear weight goes through the clipped quantizer (MSE-optimal clip of its current values,
the run's rounding) in the forward pass, with a straight-through gradient to the float shadow
weights (``compression.clipped_quant.fake_quantize``), so the network learns to work with the
quantized weights it will send. Biases and BatchNorm tensors train as usual and travel as the
extras vector. Stochastic rounding of the uplink uses a generator seeded by (seed, partition,
round), so runs repeat exactly. Contract: ``contracts.cuq``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.common import NDArrays, Scalar

from clients.base import TrainingClient
from compression.clipped_quant import fake_quantize
from compression.cuq_codec import CuqMessage, dequantize_layers, quantize_layers
from compression.layout import concat_flat, split_flat
from contracts import cuq
from contracts.cuq import ClippedUQSettings
from contracts.messages import ROUND
from core.seeding import torch_generator
from core.wire_state import quantized_split, set_wire_state, wire_keys

#: salt of the uplink rounding seed, so it differs from the training seed of the same round.
UPLINK_SALT = 0xC0A


class ClippedUQClient(TrainingClient):
    """Client side of clipped uniform quantization; see the module docstring."""

    settings: ClippedUQSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.q_index, self.e_index, self.split = quantized_split(self.model)
        keys = wire_keys(self.model)
        self.q_keys = [keys[i] for i in self.q_index]
        self.e_keys = [keys[i] for i in self.e_index]
        self.up = cuq.uplink_codec(self.settings, self.model, self.cfg.entropy)
        self.down = cuq.downlink_codec(self.settings, self.model, self.cfg.entropy)
        self.last_errors = np.zeros(0)

    # ----------------------------------------------------------------- downlink
    def load_downlink(self, arrays: NDArrays, config: dict[str, Scalar]) -> None:
        if self.down is None:
            set_wire_state(self.model, arrays)
            return
        message = self.down.decode(arrays)
        weights = dequantize_layers(message, self.down.layout)
        extras = split_flat(message.extras, self.split.extra_shapes)
        state = self.model.state_dict()
        with torch.no_grad():
            for key, array in zip(self.q_keys + self.e_keys, weights + extras, strict=True):
                state[key].copy_(torch.from_numpy(np.ascontiguousarray(array)))

    # ----------------------------------------------------------------- training
    def weight_overrides(self, step: int, total_steps: int) -> dict[str, torch.Tensor] | None:
        """With QAT, the clipped-quantized weights (straight-through) replace the float ones.

        The global torch RNG (stochastic rounding) is seeded per (seed, partition, round).
        """
        if not self.settings.qat:
            return None
        params = dict(self.model.named_parameters())
        layout = self.up.layout
        return {
            key: fake_quantize(
                params[key],
                bits,
                self.settings.rounding,
                layout.granularity,
                clip_method=self.settings.clip,
            )
            for key, bits in zip(self.q_keys, layout.widths, strict=True)
        }

    # ----------------------------------------------------------------- uplink
    def encode_uplink(self, config: dict[str, Scalar]) -> NDArrays:
        state = self.model.state_dict()
        weights = [state[k].detach().cpu().float().numpy() for k in self.q_keys]
        generator = torch_generator(
            self.cfg.seed, self.partition_id, int(config.get(ROUND, 0)), UPLINK_SALT
        )
        codes, clips, errors, _ = quantize_layers(
            weights, self.up.layout, self.settings.rounding, generator, self.settings.clip
        )
        self.last_errors = errors
        extras = concat_flat(
            [state[k].detach().cpu().numpy() for k in self.e_keys], self.settings.extras_dtype
        )
        return self.up.encode(CuqMessage(codes, clips, errors, extras))
