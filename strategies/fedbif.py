"""FedBiF (Federated Bits Freezing): m-bit quantized downlink, s activated bits per weight uplink.

Each round the server quantizes every Conv2d/Linear weight of its float global model to m bits
(Eq. 5: alpha_l = max|theta_l| / 2^(m-1), stochastic rounding of Eq. 1-2), picks the bits clients
may train (the same pattern for all clients of the round), and after training rebuilds each
client's integer weights from its activated bits plus the frozen bits it sent, then averages
(Eq. 6; uniform as in the paper, or example-weighted).

Biases and BatchNorm tensors (parameters and running statistics) are not quantized: they are
trained normally and travel as one float16 (default) or float32 vector both ways, and their bytes
count in the measured bpp. Contract: ``contracts.fedbif``; wire format:
``compression.fedbif_codec``.

With ``downlink-reference=last`` a client whose update the server accepted in an earlier round
gets the words as their difference from the words of that round (``compression.reference``),
which it kept; the server keeps the words of every round some client may still hold and forgets
a client that was sent a message but gave no accepted reply (it gets full words next time).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.common import Scalar

from compression.fedbif_codec import DownlinkMessage, gather_codes, spread_codes
from compression.primitives import max_abs_step, quantize
from compression.reference import Basis
from contracts import fedbif
from contracts.fedbif import FedBiFSettings
from core.seeding import torch_generator
from core.wire_state import quantized_split
from strategies.aggregation import gather_flat, place_flat
from strategies.base import ClientReply, ClientUpdate, CommunicationStrategy
from strategies.references import ReferenceBook

#: salt of the downlink's stochastic rounding seed.
DOWNLINK_SALT = 0xB1D


@dataclass(frozen=True)
class RoundQuantization:
    """A round's quantized global model: words (d,), steps (L,), positions, the downlink."""

    words: np.ndarray
    steps: np.ndarray
    positions: tuple[int, ...]
    downlink: list[np.ndarray]
    message: DownlinkMessage


class FedBiFStrategy(CommunicationStrategy):
    """Server side of FedBiF; see the module docstring."""

    generic_downlink = False  # the paper's own compressed downlink
    entropy_codes = True  # its words (down) and codes (up) honour entropy=ans
    reference_codes = True  # downlink-reference=last codes the words against a client's last
    uplink_reference_codes = True  # uplink-reference=received: codes against the received bits

    uplink_name = "FedBiF uplink"
    #: ``full_downlinks``: clients sent whole words (first contact, or no basis held).
    round_columns = {"sparsity": float("nan"), "active_bits": 0.0, "full_downlinks": 0}
    settings: FedBiFSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layout = self.settings.layout
        self.q_index, self.e_index, self.split = quantized_split(self.model)
        self.down = fedbif.downlink_codec(
            self.settings, self.model, self.cfg.entropy, self.cfg.downlink_reference
        )
        self.up = fedbif.uplink_codec(
            self.settings, self.model, self.cfg.entropy, self.cfg.uplink_reference
        )
        #: reference coding: which round's words each client holds.
        self.references = ReferenceBook(int(self.cfg.reference_memory_mb * 1e6))

    # --------------------------------------------------------------- per-round quantization
    def quantization(self, server_round: int) -> RoundQuantization:
        """The round's quantized model, computed once (every client gets the same message)."""
        return self.round_memo.get(
            server_round, "quantization", lambda: self._quantize(server_round)
        )

    def _quantize(self, server_round: int) -> RoundQuantization:
        generator = torch_generator(self.cfg.seed, server_round, DOWNLINK_SALT)
        stochastic = self.settings.rounding == "stochastic"
        words, steps, zeros = [], [], 0
        for index in self.q_index:
            weights = torch.from_numpy(self.global_state[index])
            step = max_abs_step(weights, self.layout.scale_levels)
            codes = quantize(
                weights,
                step,
                self.layout.low,
                self.layout.high,
                stochastic=stochastic,
                generator=generator,
            )
            zeros += int((codes == 0).sum())
            words.append(self.layout.to_unsigned(codes).numpy().reshape(-1))
            steps.append(step)
        flat_words = np.concatenate(words) if words else np.zeros(0, dtype=np.uint8)
        flat_steps = np.asarray(steps, dtype=np.float32)
        positions = self.settings.active_positions(server_round, self.cfg.seed)
        extras = gather_flat(self.global_state, self.e_index, self.settings.extras_dtype)
        message = DownlinkMessage(flat_words, flat_steps, extras)
        downlink = self.down.encode(message)
        self.record_metrics(
            server_round,
            sparsity=zeros / max(self.split.num_quantized, 1),
            active_bits=float(fedbif.positions_to_mask(positions)),
        )
        return RoundQuantization(flat_words, flat_steps, positions, downlink, message)

    def downlink_arrays(self, server_round: int, cid: str) -> list[np.ndarray]:
        sent = self.quantization(server_round)
        basis = self.references.basis_for(cid) if self.down.reference else None
        if basis is None:
            self.count_metric(server_round, "full_downlinks")
            return sent.downlink
        return self.round_memo.get(
            server_round,
            ("downlink-against", basis.round),
            lambda: self.down.encode(dataclasses.replace(sent.message, basis=basis)),
        )

    def end_round(self, server_round: int, sent: Iterable[str], accepted: set[str]) -> None:
        if self.down.reference:
            self.references.end_round(
                server_round, sent, accepted, lambda: self.quantization(server_round).words
            )

    def fit_config(self, server_round: int, cid: str) -> dict[str, Scalar]:
        positions = self.quantization(server_round).positions
        return {fedbif.ACTIVE_MASK: fedbif.positions_to_mask(positions)}

    # --------------------------------------------------------------- uplink and aggregation
    def decode_update(self, server_round: int, reply: ClientReply) -> ClientUpdate:
        """The client's model rebuilt from its activated bits over the frozen bits it was sent
        (dequantized), as a delta against the global model."""
        sent = self.quantization(server_round)
        held = None
        if self.up.reference:
            held = Basis(server_round, gather_codes(sent.words, sent.positions))
        message = self.up.decode_with(reply.arrays, held)
        integers = self.recover_integers(server_round, message.codes)
        steps = np.repeat(sent.steps.astype(np.float64), self.split.quantized_sizes)
        weights = integers * steps
        if self.settings.server_model == "float":
            # Only the client's change against the quantized weights it was sent moves the
            # server's float model; the downlink's rounding error is not made permanent.
            received = self.layout.to_signed(torch.from_numpy(sent.words)).numpy() * steps
            weights = gather_flat(self.global_state, self.q_index, "float64") + (weights - received)
        state = [array.copy() for array in self.global_state]
        place_flat(state, self.q_index, weights, self.split.quantized_shapes)
        place_flat(state, self.e_index, message.extras, self.split.extra_shapes)
        update = reply.update([])
        update.delta = self.delta_of(state)
        return update

    def client_weights(self, updates: list[ClientUpdate]) -> np.ndarray:
        """Eq. 6's uniform mean, or weighted by examples (``fedbif-weighting``)."""
        if self.settings.weighting == "examples":
            raw = np.array([u.num_examples for u in updates], dtype=np.float64)
        else:
            raw = np.ones(len(updates), dtype=np.float64)
        return raw / raw.sum()

    def recover_integers(self, server_round: int, codes: np.ndarray) -> np.ndarray:
        """A client's signed integer weights: its activated bits over the frozen bits sent."""
        sent = self.quantization(server_round)
        frozen = sent.words & np.uint8(0xFF ^ fedbif.positions_to_mask(sent.positions))
        words = frozen | spread_codes(codes, sent.positions)
        return self.layout.to_signed(torch.from_numpy(words)).numpy()
