"""FedBiF client: trains only the activated bits of each quantized weight through virtual bits.

Every Conv2d/Linear weight is rebuilt from the m bits the server sent. For the s activated bit
positions the client holds real-valued *virtual bits* v_i; the weight used in the forward pass is

    w = alpha * value(b_0, .., h(v_i), .., b_(m-1)),   h(v) = 1 if v > 0 else 0,

with the frozen bits as constants (``compression.bits.BitLayout.value_from_bits``). The step h
is straight-through. With ``fedbif-ste = identity`` (default) the gradient reaching v_i is the
chain-rule one divided by the bit's place value alpha * 2^i, i.e. exactly dL/dw for the offset
layout ("dtheta/dv_i = 1"); ``chain`` keeps the plain chain rule (dL/dw * alpha * 2^i), which
barely flips bits at ordinary learning rates (a calibration on digits: 97.5% with ``identity``
against 83% with ``chain``).

Virtual bits inheritance (VBI): the magnitudes |v| of all m virtual bits of every weight are kept
in the node's ``context.state`` (float16, m * d * 2 bytes per client) between the rounds the
client takes part in; a round starts from those magnitudes with signs set by the received bits.
The first time (or with VBI off) magnitudes are |Kaiming-normal| draws.
Biases and BatchNorm tensors are trained as usual and sent as the extras vector.

Reference coding (``downlink-reference=last``): the node also keeps the words it last received
(packed, m bits each) with their round, and rebuilds a message coded against them; a message
against words it does not hold is refused with the reason (``compression.reference``).
Contract: ``contracts.fedbif``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from flwr.common import Array, ArrayRecord, NDArrays, Scalar
from torch import nn

from clients.base import TrainingClient, held_basis, keep_basis
from compression.bits import bit_planes, step_ste
from compression.fedbif_codec import UplinkMessage, gather_codes
from compression.layout import concat_flat, split_flat
from compression.reference import Basis
from contracts import fedbif
from contracts.fedbif import FedBiFSettings
from contracts.messages import ROUND
from core.seeding import torch_generator
from core.wire_state import quantized_split, wire_keys

STATE_KEY = "fedbif"
#: ``context.state`` record of the last received words (reference coding).
WORDS_KEY = "fedbif-words"
MIN_MAGNITUDE = 1e-4  # keeps sign(v) meaningful after a float16 round trip


def kaiming_magnitudes(
    shape: tuple[int, ...], bits: int, generator: torch.Generator, scale: float = 1.0
) -> torch.Tensor:
    """|N(0, scale^2 * 2 / fan_in)| draws for the m virtual bits of a weight tensor: (m, *shape)."""
    fan_in = shape[1] * math.prod(shape[2:]) if len(shape) > 1 else shape[0]
    std = scale * math.sqrt(2.0 / max(fan_in, 1))
    return torch.randn((bits, *shape), generator=generator).abs_().mul_(std)


class FedBiFClient(TrainingClient):
    """Bit-freezing local training; see the module docstring."""

    settings: FedBiFSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layout = self.settings.layout
        self.q_index, self.e_index, self.split = quantized_split(self.model)
        keys = wire_keys(self.model)
        self.q_keys = [keys[i] for i in self.q_index]
        self.e_keys = [keys[i] for i in self.e_index]
        self.down = fedbif.downlink_codec(
            self.settings, self.model, self.cfg.entropy, self.cfg.downlink_reference
        )
        self.up = fedbif.uplink_codec(
            self.settings, self.model, self.cfg.entropy, self.cfg.uplink_reference
        )
        self.positions: tuple[int, ...] = ()
        #: the words received this round and its number (the uplink's reference basis).
        self.received: tuple[int, np.ndarray] | None = None
        self.steps: list[float] = []
        self.frozen_planes: list[torch.Tensor] = []  # (m, *shape) float 0/1 per quantized tensor
        self.virtual: list[nn.Parameter] = []  # (s, *shape) per quantized tensor
        self.magnitudes: list[torch.Tensor] = []  # (m, *shape) |v| per quantized tensor
        self._frozen_integers: list[torch.Tensor] = []  # offset layout: frozen part, per tensor

    # ----------------------------------------------------------------- downlink
    def load_downlink(self, arrays: NDArrays, config: dict[str, Scalar]) -> None:
        held = None
        if self.down.reference:
            held = held_basis(self.context, WORDS_KEY, self.layout.bits, self.split.num_quantized)
        message = self.down.decode_with(arrays, held)
        words, extras = message.words, message.extras
        server_round = int(config.get(ROUND, 0))
        if self.down.reference:
            keep_basis(self.context, WORDS_KEY, words, self.layout.bits, server_round)
        self.received = (server_round, words)
        self.positions = fedbif.mask_to_positions(
            int(config.get(fedbif.ACTIVE_MASK, 0)), self.layout.bits
        )
        if not self.positions:
            raise ValueError(f"{fedbif.ACTIVE_MASK} is missing or selects no bit")
        self.steps = [float(s) for s in message.steps]
        state = self.model.state_dict()
        with torch.no_grad():
            for key, piece in zip(
                self.e_keys, split_flat(extras, self.split.extra_shapes), strict=True
            ):
                state[key].copy_(torch.from_numpy(piece))
        self.magnitudes = self._initial_magnitudes(int(config.get(ROUND, 0)))
        self.frozen_planes, self.virtual = [], []
        self._frozen_integers = []
        word_pieces = split_flat(words, self.split.quantized_shapes)
        for key, piece, step, magnitude in zip(
            self.q_keys, word_pieces, self.steps, self.magnitudes, strict=True
        ):
            planes = bit_planes(torch.from_numpy(piece), self.layout.bits).to(self.device)
            planes = planes.to(torch.float32)
            active = planes[list(self.positions)]
            # VBI: inherited magnitude, sign from the received bit.
            virtual = torch.where(
                active > 0, magnitude[list(self.positions)], -magnitude[list(self.positions)]
            )
            self.frozen_planes.append(planes)
            self.virtual.append(nn.Parameter(virtual.contiguous()))
            weight = step * self.layout.value_from_bits(planes)
            state[key].copy_(weight)  # the module's weight is for evaluation; never trained

    def _initial_magnitudes(self, server_round: int) -> list[torch.Tensor]:
        """Magnitudes from this client's last round (VBI) or fresh Kaiming draws."""
        record = self.context.state.get(STATE_KEY) if self.settings.vbi else None
        if isinstance(record, ArrayRecord) and "magnitudes" in record:
            flat = record["magnitudes"].numpy().astype(np.float32)
            per_bit = flat.reshape(self.layout.bits, -1)
            pieces = [split_flat(row, self.split.quantized_shapes) for row in per_bit]
            return [
                torch.from_numpy(np.stack([p[t] for p in pieces]))
                .clamp_min_(MIN_MAGNITUDE)
                .to(self.device)
                for t in range(len(self.q_keys))
            ]
        generator = torch_generator(self.cfg.seed, self.partition_id, server_round, 0xB1F)
        return [
            kaiming_magnitudes(shape, self.layout.bits, generator, self.settings.init_scale)
            .clamp_min_(MIN_MAGNITUDE)
            .to(self.device)
            for shape in self.split.quantized_shapes
        ]

    # ----------------------------------------------------------------- training
    def make_optimizer(self) -> torch.optim.Optimizer:
        q_names = set(self.q_keys)
        others = [p for name, p in self.model.named_parameters() if name not in q_names]
        return torch.optim.SGD(
            [
                {"params": self.virtual, "lr": self.settings.lr, "weight_decay": 0.0},
                {
                    "params": others,
                    "lr": self.cfg.learning_rate,
                    "weight_decay": self.cfg.weight_decay,
                },
            ],
            momentum=self.cfg.momentum,
        )

    def current_weights(self) -> dict[str, torch.Tensor]:
        """The quantized weights rebuilt from frozen bits and activated virtual bits."""
        weights = {}
        positions = list(self.positions)
        if self.layout.kind == "offset":
            # The offset form is linear in the bits: frozen bits' integer part once per round,
            # plus 2^p h(v_p) per activated bit (integers, so the same float32 values as below).
            if len(self._frozen_integers) != len(self.frozen_planes):
                self._frozen_integers = [self._frozen_integer(p) for p in self.frozen_planes]
            for key, frozen, virtual, step in zip(
                self.q_keys, self._frozen_integers, self.virtual, self.steps, strict=True
            ):
                value = frozen
                for row, position in enumerate(positions):
                    scale = self.settings.ste_scale(step, position)
                    value = value + 2.0**position * step_ste(virtual[row], scale)
                weights[key] = step * value
            return weights
        for key, planes, virtual, step in zip(
            self.q_keys, self.frozen_planes, self.virtual, self.steps, strict=True
        ):
            rows = list(planes.unbind(0))
            for row, position in enumerate(positions):
                rows[position] = step_ste(virtual[row], self.settings.ste_scale(step, position))
            weights[key] = step * self.layout.value_from_bits(torch.stack(rows))
        return weights

    def _frozen_integer(self, planes: torch.Tensor) -> torch.Tensor:
        """Integer value of a tensor's frozen bits (activated planes zeroed), offset included."""
        frozen = planes.clone()
        frozen[list(self.positions)] = 0.0
        return self.layout.value_from_bits(frozen)

    def weight_overrides(self, step: int, total_steps: int) -> dict[str, torch.Tensor] | None:
        return self.current_weights()

    # ----------------------------------------------------------------- uplink
    def activated_codes(self) -> np.ndarray:
        """Per quantized scalar, its s trained bits as one s-bit code (uint8, wire order)."""
        codes = []
        for virtual in self.virtual:
            bits = (virtual.detach() > 0).to(torch.uint8).cpu()
            code = torch.zeros(bits.shape[1:], dtype=torch.uint8)
            for j in range(bits.shape[0]):
                code |= bits[j] << j
            codes.append(code.reshape(-1).numpy())
        return np.concatenate(codes) if codes else np.zeros(0, dtype=np.uint8)

    def encode_uplink(self, config: dict[str, Scalar]) -> NDArrays:
        self._save_magnitudes()
        self._sync_model_weights()
        state = self.model.state_dict()
        extras = concat_flat(
            [state[k].detach().cpu().numpy() for k in self.e_keys], self.settings.extras_dtype
        )
        basis = None
        if self.up.reference:
            if self.received is None or self.received[0] < 1:
                raise ValueError("uplink-reference=received needs the round of the message")
            server_round, words = self.received
            basis = Basis(server_round, gather_codes(words, self.positions))
        return self.up.encode(UplinkMessage(self.activated_codes(), extras, basis))

    def poison(self, received: NDArrays, factor: float) -> None:
        """Extras as the base class; a negative factor also inverts every trained bit (the
        1-bit uplink's counterpart of reversing the update; bits cannot be scaled)."""
        super().poison(received, factor)
        if factor < 0:
            with torch.no_grad():
                for virtual in self.virtual:
                    virtual.neg_()

    def _save_magnitudes(self) -> None:
        """Store |v| of all m bits (trained ones updated) as float16 in ``context.state``."""
        if not self.settings.vbi:
            return
        positions = list(self.positions)
        per_tensor = []
        for magnitude, virtual in zip(self.magnitudes, self.virtual, strict=True):
            updated = magnitude.clone()
            updated[positions] = virtual.detach().abs()
            per_tensor.append(updated.reshape(self.layout.bits, -1))
        flat = torch.cat(per_tensor, dim=1).to(torch.float16).cpu().numpy().reshape(-1)
        self.context.state[STATE_KEY] = ArrayRecord({"magnitudes": Array(flat)})

    def _sync_model_weights(self) -> None:
        """Write the trained quantized weights into the module (for local evaluation)."""
        with torch.no_grad():
            state = self.model.state_dict()
            for key, weight in self.current_weights().items():
                state[key].copy_(weight)
