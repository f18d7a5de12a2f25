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

from compression.downlink_codec import (
    DownlinkLayout,
    decode_fp16,
    decode_uq,
    encode_fp16,
    encode_uq,
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

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Downlink:
        return cls(
            mode=cfg.downlink,
            bits=cfg.downlink_bits,
            per_channel=cfg.downlink_scale == "channel",
            stochastic=cfg.downlink_rounding == "stochastic",
            entropy=cfg.entropy,
        )

    @property
    def active(self) -> bool:
        """Whether messages differ from the float32 wire state."""
        return self.mode in ("fp16", "uq")

    def layout(self, shapes: Sequence[tuple[int, ...]]) -> DownlinkLayout:
        return DownlinkLayout(tuple(tuple(s) for s in shapes), self.per_channel)

    def encode(
        self, state: Sequence[np.ndarray], rng: np.random.Generator | None = None
    ) -> list[np.ndarray]:
        """The message for ``state`` (the wire state itself when inactive)."""
        if self.mode == "fp16":
            return encode_fp16(state)
        if self.mode == "uq":
            layout = self.layout([a.shape for a in state])
            return encode_uq(
                state,
                layout,
                self.bits,
                stochastic=self.stochastic,
                rng=rng,
                entropy_mode=self.entropy,
            )
        return list(state)

    def decode(
        self, arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]]
    ) -> list[np.ndarray]:
        """The float32 wire state a message stands for; ``ValueError`` if malformed."""
        if self.mode == "fp16":
            return decode_fp16(arrays, shapes)
        if self.mode == "uq":
            return decode_uq(arrays, self.layout(shapes), self.bits, entropy_mode=self.entropy)
        return list(arrays)
