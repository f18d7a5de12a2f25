"""The generic compressed downlink both halves agree on (``compression.downlink_codec``).

Built once from the run config: the strategy encodes the global model with it, every client
decodes what it received with it. ``method`` and ``fp32`` leave the method's own downlink alone;
methods whose paper fixes a compressed downlink (FedBiF's m-bit words, LBI-FL's k_w-bit weights,
SignSGD's voted sign) refuse the other modes at start (``generic_downlink`` of their strategy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compression import reference
from compression.downlink_codec import (
    DownlinkLayout,
    UQMessage,
    decode_fp16,
    decode_uq_codes,
    encode_fp16,
    quantize_uq,
    uq_arrays,
)
from core.config import RunConfig


@dataclass(frozen=True)
class Downlink:
    """The ``downlink``/``downlink-*``/``entropy`` settings of a run."""

    mode: str
    bits: int
    per_channel: bool
    stochastic: bool
    entropy: str
    #: ``downlink-reference=last`` with ``uq``: a header first, codes against the client's last.
    reference: bool = False

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Downlink:
        return cls(
            mode=cfg.downlink,
            bits=cfg.downlink_bits,
            per_channel=cfg.downlink_scale == "channel",
            stochastic=cfg.downlink_rounding == "stochastic",
            entropy=cfg.entropy,
            reference=cfg.downlink == "uq" and cfg.downlink_reference == "last",
        )

    @property
    def active(self) -> bool:
        """Whether messages differ from the float32 wire state."""
        return self.mode in ("fp16", "uq")

    def layout(self, shapes: Sequence[tuple[int, ...]]) -> DownlinkLayout:
        return DownlinkLayout(tuple(tuple(s) for s in shapes), self.per_channel)

    def quantize(
        self, state: Sequence[np.ndarray], rng: np.random.Generator | None = None
    ) -> UQMessage:
        """The ``uq`` codes, scales and extras of ``state``."""
        layout = self.layout([a.shape for a in state])
        return quantize_uq(state, layout, self.bits, stochastic=self.stochastic, rng=rng)

    def wire(self, message: UQMessage, basis: reference.Basis | None = None) -> list[np.ndarray]:
        """The arrays of a ``uq`` message, its codes against ``basis`` if given."""
        return uq_arrays(
            message, self.bits, entropy_mode=self.entropy, with_header=self.reference, basis=basis
        )

    def encode(
        self, state: Sequence[np.ndarray], rng: np.random.Generator | None = None
    ) -> list[np.ndarray]:
        """The message for ``state`` (the wire state itself when inactive)."""
        if self.mode == "fp16":
            return encode_fp16(state)
        if self.mode == "uq":
            return self.wire(self.quantize(state, rng))
        return list(state)

    def decode(
        self, arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]]
    ) -> list[np.ndarray]:
        """The float32 state a message stands for; ``ValueError`` if malformed."""
        return self.decode_codes(arrays, shapes)[0]

    def decode_codes(
        self,
        arrays: Sequence[np.ndarray],
        shapes: Sequence[tuple[int, ...]],
        held: reference.Basis | None = None,
    ) -> tuple[list[np.ndarray], np.ndarray | None]:
        """(float32 state, its ``uq`` codes or None) of a message, a reference-coded one
        resolved against ``held``; ``ValueError`` if malformed or against other codes."""
        if self.mode == "fp16":
            return decode_fp16(arrays, shapes), None
        if self.mode == "uq":
            return decode_uq_codes(
                arrays,
                self.layout(shapes),
                self.bits,
                entropy_mode=self.entropy,
                with_header=self.reference,
                held=held,
            )
        return list(arrays), None
