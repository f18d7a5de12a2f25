"""Wire formats of FedBiF (pure NumPy; both ends know the model's tensor shapes).

A model's wire tensors split into *quantized* ones (Conv2d/Linear weights) and *extras* (biases,
BatchNorm affine parameters and running statistics). All quantized tensors are flattened in wire
order and concatenated into one vector of d scalars; all extras likewise into one vector of e.
Few large arrays keep the ~128-byte ``.npy`` header per array negligible.

Downlink, server -> client (3 arrays, ``FedBiFDownlinkCodec``):
    0. uint8  ``pack_codes(words, m)``: the m-bit unsigned word of every quantized scalar,
       ceil(d * m / 8) bytes (``compression.bits`` says how a word encodes the integer);
    1. float32 (L,): the step size alpha_l of each of the L quantized tensors (Eq. 5);
    2. float16 or float32 (e,): the extras.
With reference coding (``reference=True``, run key ``downlink-reference=last``) a header comes
first (4 arrays): int64 (2,) ``[basis round, CRC-32 of the basis words]``
(``compression.reference``); with a basis, array 0 holds ``(words - basis) mod 2^m`` instead of
the words, and the receiver adds it to the words it kept from that round.
Uplink, client -> server (2 arrays, ``FedBiFUplinkCodec``):
    0. uint8  ``pack_codes(codes, s)``: per quantized scalar, its s activated bits as one s-bit
       code (bit j = the j-th activated position, ascending), ceil(d * s / 8) bytes;
    1. float16 or float32 (e,): the client's trained extras.
With uplink reference coding (``reference=True``, run key ``uplink-reference=received``) a
header comes first (3 arrays): int64 (2,) ``[round, CRC-32 of the basis codes]``, the basis being
the activated bits of the words the client received that round (which the server sent, so holds);
array 0 then holds ``(codes - basis) mod 2^s``: for s = 1 the bits local training flipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compression import entropy, reference
from compression.codec import Codec
from compression.layout import SplitLayout, checked_floats
from compression.packing import packed_size


@dataclass(frozen=True)
class DownlinkMessage:
    """m-bit words (d,) uint8, steps (L,) float32, extras (e,); ``basis``: words the receiver
    holds that the words are coded against (reference coding; None: full words)."""

    words: np.ndarray
    steps: np.ndarray
    extras: np.ndarray
    basis: reference.Basis | None = None


@dataclass(frozen=True)
class UplinkMessage:
    """s-bit activated-bit codes (d,) uint8 and the client's extras (e,); ``basis``: the
    activated bits of the received words, which the codes are sent against (None: full codes)."""

    codes: np.ndarray
    extras: np.ndarray
    basis: reference.Basis | None = None


@dataclass(frozen=True)
class FedBiFDownlinkCodec(Codec[DownlinkMessage]):
    """The m-bit downlink; ``extras_dtype`` is what the server sends."""

    split: SplitLayout
    bits: int
    extras_dtype: str = "float16"
    #: ``ans``: the words travel as a ``compression.entropy`` stream instead of packed bits.
    entropy: str = "none"
    #: a header array first, and words coded against a basis the receiver holds.
    reference: bool = False
    name = "FedBiF downlink"

    @property
    def num_arrays(self) -> int:  # type: ignore[override]
        return 4 if self.reference else 3

    def encode(self, message: DownlinkMessage) -> list[np.ndarray]:
        symbols = reference.symbols_against(message.words, message.basis, self.bits, self.reference)
        arrays = [
            entropy.pack(symbols, self.bits, self.entropy),
            np.asarray(message.steps, dtype=np.float32),
            np.asarray(message.extras).astype(self.extras_dtype, copy=False),
        ]
        return reference.framed(arrays, message.basis, self.reference)

    def decode_with(
        self, arrays: Sequence[np.ndarray], held: reference.Basis | None
    ) -> DownlinkMessage:
        """``decode`` for a receiver holding ``held`` (the words of its last message)."""
        basis_round, crc, arrays = reference.take_header(
            arrays, self.num_arrays, self.name, self.reference
        )
        packed, steps, extras = arrays
        symbols = entropy.unpack(packed, self.bits, self.split.num_quantized, self.entropy)
        words = reference.resolve(symbols, basis_round, crc, held, self.bits)
        steps = checked_floats(steps, (len(self.split.quantized_shapes),), "steps", ("float32",))
        if np.any(steps <= 0):
            raise ValueError("steps must be positive")
        extras = checked_floats(extras, (self.split.num_extras,), "extras", (self.extras_dtype,))
        return DownlinkMessage(words, steps, extras)

    def _decode(self, arrays: list[np.ndarray]) -> DownlinkMessage:
        return self.decode_with(arrays, None)

    def payload_nbytes(self, message: DownlinkMessage | None = None) -> int:
        """Bytes of the arrays; with ``entropy=ans`` or a basis the size is ``message``'s own."""
        if message is not None and (self.entropy == "ans" or message.basis is not None):
            return sum(a.nbytes for a in self.encode(message))
        header = reference.HEADER_BYTES if self.reference else 0
        return (
            header
            + packed_size(self.split.num_quantized, self.bits)
            + 4 * len(self.split.quantized_shapes)
            + self.split.num_extras * np.dtype(self.extras_dtype).itemsize
        )


@dataclass(frozen=True)
class FedBiFUplinkCodec(Codec[UplinkMessage]):
    """The s-bit uplink; ``extras_dtype`` is what the client sends."""

    split: SplitLayout
    active_bits: int
    extras_dtype: str = "float16"
    entropy: str = "none"
    #: a header array first, and codes sent against the activated bits the client received.
    reference: bool = False
    name = "FedBiF uplink"

    @property
    def num_arrays(self) -> int:  # type: ignore[override]
        return 3 if self.reference else 2

    def encode(self, message: UplinkMessage) -> list[np.ndarray]:
        symbols = reference.symbols_against(
            message.codes, message.basis, self.active_bits, self.reference
        )
        arrays = [
            entropy.pack(symbols, self.active_bits, self.entropy),
            np.asarray(message.extras).astype(self.extras_dtype, copy=False),
        ]
        return reference.framed(arrays, message.basis, self.reference)

    def decode_with(
        self, arrays: Sequence[np.ndarray], held: reference.Basis | None
    ) -> UplinkMessage:
        """``decode`` for a server holding ``held`` (the activated bits it sent the client this
        round), which a reference-coded upload must name in its header."""
        basis_round, crc, arrays = reference.take_header(
            arrays, self.num_arrays, self.name, self.reference
        )
        packed, extras = arrays
        symbols = entropy.unpack(packed, self.active_bits, self.split.num_quantized, self.entropy)
        codes = reference.resolve(symbols, basis_round, crc, held, self.active_bits)
        extras = checked_floats(extras, (self.split.num_extras,), "extras", (self.extras_dtype,))
        return UplinkMessage(codes, extras)

    def _decode(self, arrays: list[np.ndarray]) -> UplinkMessage:
        return self.decode_with(arrays, None)

    def payload_nbytes(self, message: UplinkMessage | None = None) -> int:
        """Bytes of the arrays; with ``entropy=ans`` or a basis the size is ``message``'s own."""
        if message is not None and (self.entropy == "ans" or message.basis is not None):
            return sum(a.nbytes for a in self.encode(message))
        header = reference.HEADER_BYTES if self.reference else 0
        return (
            header
            + packed_size(self.split.num_quantized, self.active_bits)
            + self.split.num_extras * np.dtype(self.extras_dtype).itemsize
        )


def spread_codes(codes: np.ndarray, positions: Sequence[int]) -> np.ndarray:
    """Place bit j of each s-bit code at bit ``positions[j]`` of an m-bit word (uint8)."""
    words = np.zeros(codes.shape, dtype=np.uint8)
    for j, position in enumerate(positions):
        words |= ((codes >> j) & 1).astype(np.uint8) << np.uint8(position)
    return words


def gather_codes(words: np.ndarray, positions: Sequence[int]) -> np.ndarray:
    """Inverse of ``spread_codes``: the bits at ``positions`` of each word as an s-bit code."""
    codes = np.zeros(words.shape, dtype=np.uint8)
    for j, position in enumerate(positions):
        codes |= ((words >> np.uint8(position)) & 1).astype(np.uint8) << np.uint8(j)
    return codes
