"""Bit decomposition of integer codes, and the straight-through step function.

Two layouts of an m-bit integer, both as m unsigned bits b_0 (LSB) .. b_(m-1):

* ``offset`` (FedBiF Eq. 4): value = sum_i 2^i b_i - 2^(m-1), range [-2^(m-1), 2^(m-1) - 1].
  No sign bit; the value is exactly 0 when b_(m-1) = 1 and every other bit is 0.
* ``sign-magnitude`` (the FedBiF paper's ablation): value = (1 - 2 b_(m-1)) * sum_(i<m-1) 2^i b_i,
  range [-(2^(m-1) - 1), 2^(m-1) - 1].

``unsigned`` is the m-bit word sum_i 2^i b_i; it is what ``compression.packing`` puts on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("offset", "sign-magnitude")


@dataclass(frozen=True)
class BitLayout:
    """How m bits encode a signed integer; see the module docstring."""

    bits: int
    kind: str = "offset"

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.kind!r}")
        minimum = 2 if self.kind == "sign-magnitude" else 1
        if not minimum <= self.bits <= 8:
            raise ValueError(f"{self.kind} layout needs {minimum}..8 bits, got {self.bits}")

    @property
    def low(self) -> int:
        half = 2 ** (self.bits - 1)
        return -half if self.kind == "offset" else -(half - 1)

    @property
    def high(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def scale_levels(self) -> int:
        """max|x| maps to this many steps (Eq. 5: 2^(m-1) for the offset layout)."""
        half = 2 ** (self.bits - 1)
        return half if self.kind == "offset" else half - 1

    def to_unsigned(self, codes: torch.Tensor) -> torch.Tensor:
        """Signed codes in [low, high] -> m-bit words (uint8)."""
        if self.kind == "offset":
            return (codes + 2 ** (self.bits - 1)).to(torch.uint8)
        sign = (codes < 0).to(torch.int32) << (self.bits - 1)
        return (sign | codes.abs().to(torch.int32)).to(torch.uint8)

    def to_signed(self, words: torch.Tensor) -> torch.Tensor:
        """m-bit words -> signed codes (int32)."""
        words = words.to(torch.int32)
        if self.kind == "offset":
            return words - 2 ** (self.bits - 1)
        magnitude = words & (2 ** (self.bits - 1) - 1)
        return torch.where(words >> (self.bits - 1) == 1, -magnitude, magnitude)

    def value_from_bits(self, planes: torch.Tensor) -> torch.Tensor:
        """Signed value from a (m, ...) stack of bit values (floats; differentiable)."""
        powers = 2.0 ** torch.arange(self.bits, device=planes.device, dtype=planes.dtype)
        powers = powers.view(-1, *([1] * (planes.dim() - 1)))
        if self.kind == "offset":
            return (planes * powers).sum(0) - 2 ** (self.bits - 1)
        magnitude = (planes[:-1] * powers[:-1]).sum(0)
        return (1.0 - 2.0 * planes[-1]) * magnitude


def bit_planes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """(bits, ...) uint8 stack: plane i holds bit i of every word."""
    shifts = torch.arange(bits, device=words.device, dtype=torch.int32)
    shifts = shifts.view(-1, *([1] * words.dim()))
    return ((words.to(torch.int32).unsqueeze(0) >> shifts) & 1).to(torch.uint8)


def compose_planes(planes: torch.Tensor) -> torch.Tensor:
    """Inverse of ``bit_planes``: (bits, ...) 0/1 values -> uint8 words."""
    shifts = torch.arange(planes.shape[0], device=planes.device, dtype=torch.int32)
    shifts = shifts.view(-1, *([1] * (planes.dim() - 1)))
    return (planes.to(torch.int32) << shifts).sum(0).to(torch.uint8)


class StepSTE(torch.autograd.Function):
    """h(v) = 1 if v > 0 else 0 forward; straight-through backward: dh/dv = ``grad_scale``
    (1 = the identity of the STE; FedBiF uses a place-value scale, see ``clients.fedbif``)."""

    @staticmethod
    def forward(ctx, virtual: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
        ctx.grad_scale = grad_scale
        return (virtual > 0).to(virtual.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output * ctx.grad_scale, None


def step_ste(virtual: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
    """Binary bit values of ``virtual`` with a straight-through gradient."""
    return StepSTE.apply(virtual, grad_scale)
