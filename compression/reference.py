"""Reference coding: m-bit codes sent as their difference from codes the receiver already holds.

A model's codes change little from one round to the next (FedBiF's m-bit words: 4-48% of the
words change per round on digits, about 0.3-2.3 bits of entropy per word against ~3.9 for the
words themselves). A receiver that kept the codes of its last message can rebuild the new ones
exactly from the difference ``(new - held) mod 2^m``, which an entropy stage codes in far fewer
bits. Lossless: the receiver ends with exactly the codes a full message would have carried.

Wire header (``header``): one int64 array of 2 values, ``[basis round, CRC-32 of the basis
codes]``; round 0 means "full codes, no basis". The receiver refuses a difference whose basis it
does not hold (other round, or same round but other codes), so a desynchronised peer fails with
a reason instead of rebuilding a wrong model.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HEADER_DTYPE = np.dtype("int64")
HEADER_SIZE = 2
#: bytes of the header array's payload (what ``payload_nbytes`` counts for it).
HEADER_BYTES = HEADER_SIZE * HEADER_DTYPE.itemsize
#: basis round of a message that carries full codes.
NO_BASIS = 0


def digest(codes: np.ndarray) -> int:
    """CRC-32 of uint8 codes (how both ends name the same basis)."""
    return zlib.crc32(np.ascontiguousarray(codes, dtype=np.uint8).tobytes())


@dataclass(frozen=True)
class Basis:
    """Codes a receiver holds, named by the round whose message carried them."""

    round: int
    codes: np.ndarray

    def __post_init__(self) -> None:
        if self.round <= NO_BASIS:
            raise ValueError(f"a basis round must be >= 1, got {self.round}")

    @property
    def digest(self) -> int:
        return digest(self.codes)


def _mask(bits: int) -> np.uint8:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return np.uint8((1 << bits) - 1)


def difference(codes: np.ndarray, basis: np.ndarray, bits: int) -> np.ndarray:
    """``(codes - basis) mod 2^bits`` as uint8 (same length required)."""
    codes, basis = np.asarray(codes, np.uint8), np.asarray(basis, np.uint8)
    if codes.shape != basis.shape:
        raise ValueError(f"codes {codes.shape} and basis {basis.shape} differ in shape")
    return (codes - basis) & _mask(bits)  # uint8 arithmetic wraps mod 256


def restore(diff: np.ndarray, basis: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of ``difference``: ``(basis + diff) mod 2^bits`` as uint8."""
    diff, basis = np.asarray(diff, np.uint8), np.asarray(basis, np.uint8)
    if diff.shape != basis.shape:
        raise ValueError(f"difference {diff.shape} and basis {basis.shape} differ in shape")
    return (basis + diff) & _mask(bits)


def symbols_against(
    codes: np.ndarray, basis: Basis | None, bits: int, with_header: bool
) -> np.ndarray:
    """What a message codes: ``codes`` themselves, or their difference from ``basis``, which
    only a codec that sends the header (``with_header``) may use."""
    if basis is None:
        return codes
    if not with_header:
        raise ValueError("a basis needs a codec built with reference=True")
    return difference(codes, basis.codes, bits)


def framed(arrays: list[np.ndarray], basis: Basis | None, with_header: bool) -> list[np.ndarray]:
    """``arrays`` with the header naming ``basis`` first when the codec sends headers."""
    return [header(basis), *arrays] if with_header else arrays


def header(basis: Basis | None) -> np.ndarray:
    """The header array of a message coded against ``basis`` (None: full codes)."""
    if basis is None:
        return np.array([NO_BASIS, 0], dtype=HEADER_DTYPE)
    return np.array([basis.round, basis.digest], dtype=HEADER_DTYPE)


def read_header(array: np.ndarray) -> tuple[int, int]:
    """(basis round, basis CRC) of a received header; ``ValueError`` if malformed."""
    array = np.asarray(array)
    if array.dtype != HEADER_DTYPE or array.shape != (HEADER_SIZE,):
        raise ValueError(
            f"reference header must be int64 of shape ({HEADER_SIZE},), "
            f"got {array.dtype} {array.shape}"
        )
    basis_round, crc = int(array[0]), int(array[1])
    if basis_round < NO_BASIS:
        raise ValueError(f"reference header names basis round {basis_round} (< 0)")
    if not 0 <= crc < 1 << 32 or (basis_round == NO_BASIS and crc != 0):
        raise ValueError(f"reference header has an invalid CRC {crc} for round {basis_round}")
    return basis_round, crc


def take_header(
    arrays: Sequence[np.ndarray], expected: int, name: str, with_header: bool
) -> tuple[int, int, list[np.ndarray]]:
    """(basis round, CRC, the other arrays) of a received message of ``expected`` arrays, the
    header first when ``with_header`` (else round ``NO_BASIS``); ``ValueError`` on a wrong count."""
    arrays = list(arrays)
    if len(arrays) != expected:
        raise ValueError(f"{name} has {expected} arrays, got {len(arrays)}")
    if not with_header:
        return NO_BASIS, 0, arrays
    basis_round, crc = read_header(arrays[0])
    return basis_round, crc, arrays[1:]


def resolve(
    symbols: np.ndarray, basis_round: int, crc: int, held: Basis | None, bits: int
) -> np.ndarray:
    """The codes a message stands for: ``symbols`` themselves (no basis), or ``symbols`` added
    to the held basis, which must be the one the header names."""
    if basis_round == NO_BASIS:
        return np.asarray(symbols, np.uint8)
    if held is None:
        raise ValueError(
            f"message is coded against the codes of round {basis_round}, and this node holds none"
        )
    if held.round != basis_round or held.digest != crc:
        raise ValueError(
            f"message is coded against the codes of round {basis_round} (CRC {crc:#010x}); "
            f"this node holds round {held.round} (CRC {held.digest:#010x})"
        )
    return restore(symbols, held.codes, bits)
