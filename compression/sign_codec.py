"""Sign codecs of SignSGD with majority vote and EF-SignSGD (pure NumPy).

A sign is one bit: bit 1 = +1 (the value was >= 0), bit 0 = -1. Zero maps to +1 so that every
scalar carries a vote; the error feedback of EF-SignSGD absorbs the difference.

Wire formats (p signed scalars in wire order, L tensors, e float16 statistics; ``pack_codes``
with k = 1, so ceil(p / 8) bytes):

* ``pack_signs``: uint8 (ceil(p / 8),), the sign bits of a flat vector.
* ``SignCodec`` (SignSGD's uplink and its 1-bit voted downlink), two arrays:
    0. uint8 ``pack_signs(v)``;
    1. float16 (e,): values that are not signs (BatchNorm running statistics).
* ``ScaledSignCodec`` (EF-SignSGD, Karimireddy et al. 2019), three arrays:
    0. uint8 ``pack_signs(v)``;
    1. float32 (L,): per tensor l, ||v_l||_1 / d_l; decoded tensor = that scale * sign(v_l);
    2. float16 (e,): the statistics, as in ``SignCodec``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compression.codec import Codec
from compression.layout import checked_floats
from compression.packing import pack_codes, packed_size, unpack_codes


def sign_bits(values: np.ndarray) -> np.ndarray:
    """uint8 sign bits (1 for >= 0) of a flat vector."""
    return (np.asarray(values).reshape(-1) >= 0).astype(np.uint8)


def pack_signs(values: np.ndarray) -> np.ndarray:
    """Sign bits of ``values`` packed 8 per byte."""
    return pack_codes(sign_bits(values), 1)


def unpack_signs(packed: np.ndarray, count: int) -> np.ndarray:
    """float32 vector of +1/-1 from ``pack_signs`` bytes; checks the byte count exactly."""
    bits = unpack_codes(packed, 1, count)
    return bits.astype(np.float32) * 2.0 - 1.0


def majority_vote(signs: np.ndarray, tie_break: np.ndarray) -> np.ndarray:
    """Elementwise majority of a (clients, d) matrix of +1/-1 votes, one vote per client.

    A tie (possible with an even number of voters) takes the value of ``tie_break`` (+1/-1), which
    the caller draws at random so that ties do not drift the model in one direction.
    """
    total = np.asarray(signs, dtype=np.int64).sum(axis=0)
    voted = np.sign(total).astype(np.float32)
    ties = total == 0
    voted[ties] = np.asarray(tie_break, dtype=np.float32).reshape(-1)[ties]
    return voted


def apply_sign_step(base: np.ndarray, signs: np.ndarray, step: float) -> np.ndarray:
    """``base + step * signs`` in float32: server and clients run this same operation, so the
    model a client rebuilds from a 1-bit downlink is bit-identical to the server's."""
    return (base.astype(np.float32) + np.float32(step) * signs.astype(np.float32)).astype(
        np.float32
    )


def scaled_sign(flat: np.ndarray, sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(+1/-1 signs (d,) float32, per-tensor scales ||v_l||_1 / d_l) of a flat vector."""
    flat = np.asarray(flat, dtype=np.float32).reshape(-1)
    if flat.size != sum(sizes):
        raise ValueError(f"expected {sum(sizes)} scalars, got {flat.size}")
    pieces = np.split(flat, np.cumsum(sizes)[:-1]) if sizes else []
    scales = np.array(
        [np.abs(p.astype(np.float64)).mean() if p.size else 0.0 for p in pieces],
        dtype=np.float32,
    )
    return sign_bits(flat).astype(np.float32) * 2.0 - 1.0, scales


def scaled_sign_values(signs: np.ndarray, scales: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """float32 (d,): each tensor's scale times its signs (what an EF-SignSGD message stands for)."""
    return signs * np.repeat(scales, sizes)


@dataclass(frozen=True)
class SignMessage:
    """+1/-1 signs (p,) float32 and float16 statistics (e,)."""

    signs: np.ndarray
    stats: np.ndarray


@dataclass(frozen=True)
class SignCodec(Codec[SignMessage]):
    """SignSGD's 1-bit message (both directions)."""

    num_signs: int
    num_stats: int
    name = "a SignSGD message"
    num_arrays = 2

    def encode(self, message: SignMessage) -> list[np.ndarray]:
        return [pack_signs(message.signs), np.asarray(message.stats).astype(np.float16)]

    def _decode(self, arrays: list[np.ndarray]) -> SignMessage:
        signs = unpack_signs(arrays[0], self.num_signs)
        checked_floats(arrays[1], (self.num_stats,), "statistics", ("float16",))
        return SignMessage(signs, np.asarray(arrays[1]))

    def payload_nbytes(self, message: SignMessage | None = None) -> int:
        return packed_size(self.num_signs, 1) + 2 * self.num_stats


@dataclass(frozen=True)
class ScaledSignMessage:
    """+1/-1 signs (p,) float32, per-tensor scales (L,) float32, float16 statistics (e,)."""

    signs: np.ndarray
    scales: np.ndarray
    stats: np.ndarray


@dataclass(frozen=True)
class ScaledSignCodec(Codec[ScaledSignMessage]):
    """EF-SignSGD's uplink; ``sizes`` are the signed tensors' sizes."""

    sizes: tuple[int, ...]
    num_stats: int
    name = "an EF-SignSGD message"
    num_arrays = 3

    def encode(self, message: ScaledSignMessage) -> list[np.ndarray]:
        return [
            pack_signs(message.signs),
            np.asarray(message.scales, dtype=np.float32),
            np.asarray(message.stats).astype(np.float16),
        ]

    def _decode(self, arrays: list[np.ndarray]) -> ScaledSignMessage:
        packed, scales, stats = arrays
        scales = np.asarray(scales)
        if scales.dtype != np.float32 or scales.shape != (len(self.sizes),):
            raise ValueError(
                f"scales must be float32 ({len(self.sizes)},), got {scales.dtype} {scales.shape}"
            )
        if not np.all(np.isfinite(scales)) or np.any(scales < 0):
            raise ValueError("scales must be finite and non-negative")
        signs = unpack_signs(packed, int(sum(self.sizes)))
        checked_floats(stats, (self.num_stats,), "statistics", ("float16",))
        return ScaledSignMessage(signs, scales, np.asarray(stats))

    def payload_nbytes(self, message: ScaledSignMessage | None = None) -> int:
        return packed_size(int(sum(self.sizes)), 1) + 4 * len(self.sizes) + 2 * self.num_stats
