"""A compressed downlink any method can use: the global model as fp16 or uniform-quantized codes.

8 of 11 methods send their clients the float32 model every round, so half of their traffic is
uncompressed. This codec sends the same wire state (``core.wire_state`` order) smaller; the
server keeps its float32 model, and every client starts from exactly what it decodes.

``fp16`` wire format: one float16 array per wire tensor, in wire order, same shapes.

``uq`` wire format (three arrays):

1. ``codes``: every quantized tensor's codes, concatenated in wire order, flattened row-major.
   Without entropy coding, ``pack_codes(codes, bits)`` (``compression.packing``); with
   ``entropy=ans``, the ``compression.entropy`` stream of the same codes. A code c in
   ``[0, 2**bits - 2]`` stands for ``(c - L) * scale``, L = 2**(bits-1) - 1: a symmetric grid
   with zero on it (pruned weights stay exactly 0).
2. ``scales``: float32, one per output channel (dim 0) of each quantized tensor
   (``per_channel``), or one per tensor; scale = max|w| / L of its channel or tensor (0 for an
   all-zero one).
3. ``extras``: float32, the tensors that are not quantized (biases, BatchNorm weights and
   statistics, anything with fewer than 2 dimensions), concatenated in wire order: exact, since
   a BatchNorm running variance off by a rounding step changes every activation.

With reference coding (``downlink-reference=last``) a header comes first (four arrays): int64
(2,) ``[basis round, CRC-32 of the basis codes]`` (``compression.reference``); with a basis, the
codes array holds ``(codes - basis) mod 2^bits`` and the receiver adds the codes it kept.

Rounding is to the nearest level, or stochastic (unbiased) with a seeded generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compression import entropy, reference
from compression.packing import packed_size, unpack_codes

DOWNLINK_MODES = ("method", "fp32", "fp16", "uq")
ENTROPY_MODES = ("none", "ans")


def levels(bits: int) -> int:
    """L, the largest code magnitude of the symmetric ``bits``-bit grid."""
    if not 2 <= bits <= 8:
        raise ValueError(f"downlink bits must be 2..8, got {bits}")
    return (1 << (bits - 1)) - 1


@dataclass(frozen=True)
class DownlinkLayout:
    """Which wire tensors are quantized (dims >= 2) and the sizes both ends agree on."""

    shapes: tuple[tuple[int, ...], ...]
    per_channel: bool

    @property
    def quantized(self) -> tuple[int, ...]:
        return tuple(i for i, shape in enumerate(self.shapes) if len(shape) >= 2)

    @property
    def extras(self) -> tuple[int, ...]:
        return tuple(i for i, shape in enumerate(self.shapes) if len(shape) < 2)

    def groups(self, index: int) -> int:
        """Scale groups of tensor ``index``: its output channels, or 1."""
        return int(self.shapes[index][0]) if self.per_channel else 1

    @property
    def num_codes(self) -> int:
        return sum(int(np.prod(self.shapes[i])) for i in self.quantized)

    @property
    def num_scales(self) -> int:
        return sum(self.groups(i) for i in self.quantized)

    @property
    def num_extras(self) -> int:
        return sum(int(np.prod(self.shapes[i])) for i in self.extras)


def encode_fp16(state: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each wire tensor as float16 (values beyond float16's range saturate, never inf)."""
    limit = np.finfo(np.float16).max
    return [np.clip(np.asarray(a, np.float32), -limit, limit).astype(np.float16) for a in state]


def decode_fp16(
    arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]]
) -> list[np.ndarray]:
    """The float32 state of an ``encode_fp16`` message; ``ValueError`` if it is not one."""
    if len(arrays) != len(shapes):
        raise ValueError(f"fp16 downlink needs {len(shapes)} arrays, got {len(arrays)}")
    out = []
    for i, (array, shape) in enumerate(zip(arrays, shapes, strict=True)):
        if array.dtype != np.float16 or tuple(array.shape) != tuple(shape):
            raise ValueError(f"fp16 downlink array {i}: expected float16 {shape}")
        if not np.isfinite(array).all():
            raise ValueError(f"fp16 downlink array {i} is not finite")
        out.append(array.astype(np.float32))
    return out


@dataclass(frozen=True)
class UQMessage:
    """A quantized wire state: codes (num_codes,) uint8, scales, extras (float32)."""

    codes: np.ndarray
    scales: np.ndarray
    extras: np.ndarray


def quantize_uq(
    state: Sequence[np.ndarray],
    layout: DownlinkLayout,
    bits: int,
    *,
    stochastic: bool = False,
    rng: np.random.Generator | None = None,
) -> UQMessage:
    """The codes, scales and extras of ``state`` (see the module docstring)."""
    top = levels(bits)
    codes, scales = [], []
    for i in layout.quantized:
        weight = np.asarray(state[i], np.float32).reshape(layout.groups(i), -1)
        scale = np.abs(weight).max(axis=1, initial=0.0) / np.float32(top)
        safe = np.where(scale > 0, scale, np.float32(1.0))[:, None]
        scaled = weight / safe
        if stochastic:
            if rng is None:
                raise ValueError("stochastic rounding needs a seeded generator")
            rounded = np.floor(scaled + rng.random(scaled.shape, dtype=np.float32))
        else:
            rounded = np.rint(scaled)
        codes.append((np.clip(rounded, -top, top) + top).astype(np.uint8).reshape(-1))
        scales.append(scale.astype(np.float32))
    extras = [np.asarray(state[i], np.float32).reshape(-1) for i in layout.extras]
    return UQMessage(
        np.concatenate(codes) if codes else np.zeros(0, np.uint8),
        np.concatenate(scales) if scales else np.zeros(0, np.float32),
        np.concatenate(extras) if extras else np.zeros(0, np.float32),
    )


def uq_arrays(
    message: UQMessage,
    bits: int,
    *,
    entropy_mode: str = "none",
    with_header: bool = False,
    basis: reference.Basis | None = None,
) -> list[np.ndarray]:
    """The wire arrays of ``message``; ``with_header``: reference coding's header first, and
    the codes as their difference from ``basis`` when one is given."""
    if basis is not None and not with_header:
        raise ValueError("a basis needs the reference header")
    symbols = (
        message.codes if basis is None else reference.difference(message.codes, basis.codes, bits)
    )
    arrays = [entropy.pack(symbols, bits, entropy_mode), message.scales, message.extras]
    return [reference.header(basis), *arrays] if with_header else arrays


def encode_uq(
    state: Sequence[np.ndarray],
    layout: DownlinkLayout,
    bits: int,
    *,
    stochastic: bool = False,
    rng: np.random.Generator | None = None,
    entropy_mode: str = "none",
) -> list[np.ndarray]:
    """The ``uq`` message of ``state`` (see the module docstring)."""
    message = quantize_uq(state, layout, bits, stochastic=stochastic, rng=rng)
    return uq_arrays(message, bits, entropy_mode=entropy_mode)


def decode_uq(
    arrays: Sequence[np.ndarray],
    layout: DownlinkLayout,
    bits: int,
    *,
    entropy_mode: str = "none",
) -> list[np.ndarray]:
    """The float32 state a ``uq`` message stands for; ``ValueError`` on anything malformed."""
    return decode_uq_codes(arrays, layout, bits, entropy_mode=entropy_mode)[0]


def decode_uq_codes(
    arrays: Sequence[np.ndarray],
    layout: DownlinkLayout,
    bits: int,
    *,
    entropy_mode: str = "none",
    with_header: bool = False,
    held: reference.Basis | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """(float32 state, codes) of a ``uq`` message; ``with_header``: a reference-coded one,
    resolved against ``held`` (the codes the receiver kept); ``ValueError`` if malformed."""
    basis_round, crc, arrays = reference.take_header(
        arrays, 4 if with_header else 3, "a uq downlink message", with_header
    )
    wire_codes, scales, extras = (np.asarray(a) for a in arrays)
    top = levels(bits)
    if wire_codes.dtype != np.uint8 or wire_codes.ndim != 1:
        raise ValueError("uq downlink codes must be 1-D uint8")
    if entropy_mode == "ans":
        codes = entropy.decode(wire_codes, bits, layout.num_codes)
    else:
        if wire_codes.size != packed_size(layout.num_codes, bits):
            raise ValueError(
                f"uq downlink codes: {layout.num_codes} codes of {bits} bits need "
                f"{packed_size(layout.num_codes, bits)} bytes, got {wire_codes.size}"
            )
        codes = unpack_codes(wire_codes, bits, layout.num_codes)
    codes = reference.resolve(codes, basis_round, crc, held, bits)
    if codes.size and int(codes.max()) > 2 * top:
        raise ValueError(f"uq downlink code above {2 * top}")
    for name, array, size in (
        ("scales", scales, layout.num_scales),
        ("extras", extras, layout.num_extras),
    ):
        if array.dtype != np.float32 or array.shape != (size,):
            raise ValueError(f"uq downlink {name}: expected float32 ({size},)")
        if not np.isfinite(array).all():
            raise ValueError(f"uq downlink {name} are not finite")
    if (scales < 0).any():
        raise ValueError("uq downlink scales must be >= 0")
    largest = np.finfo(np.float32).max / np.float32(max(top, 1))
    if scales.size and float(scales.max()) > largest:
        raise ValueError(
            f"uq downlink scale {float(scales.max()):.3g} is above {largest:.3g}: its {top} "
            f"levels would overflow float32"
        )
    state: list[np.ndarray | None] = [None] * len(layout.shapes)
    code_at = scale_at = extra_at = 0
    for i in layout.quantized:
        shape, groups = layout.shapes[i], layout.groups(i)
        size = int(np.prod(shape))
        block = codes[code_at : code_at + size].astype(np.float32).reshape(groups, -1) - top
        scale = scales[scale_at : scale_at + groups][:, None]
        state[i] = (block * scale).reshape(shape)
        code_at, scale_at = code_at + size, scale_at + groups
    for i in layout.extras:
        shape = layout.shapes[i]
        size = int(np.prod(shape))
        state[i] = extras[extra_at : extra_at + size].reshape(shape).copy()
        extra_at += size
    return [s for s in state if s is not None], codes
