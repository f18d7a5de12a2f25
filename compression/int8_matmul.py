"""Integer products of low-bit layers: int8 x int8 -> int32 for Linear and Conv2d (im2col).

``compression.lowbit`` simulates integer arithmetic in floating point (fake quantization). This
module runs the forward product on the integer codes themselves:

    acc = A_codes @ W_codes^T  (int32, exact)     y = acc * (s_a * s_w) + bias   (float32)

with ``A_codes`` the activations' codes (one row per output position: the input rows of a
Linear, or the im2col patches of a Conv2d from ``torch.nn.functional.unfold``) and ``W_codes``
the weights' codes, one row per output channel.

Backends:

* ``cuda``: ``torch._int_mm`` (cuBLASLt INT8 GEMM on tensor cores). Its constraints are met by
  zero padding, which adds nothing to a sum: more than 16 rows, and the inner and output sizes
  multiples of 8. The weight operand is passed as the transpose of the row-major (n, k) codes,
  i.e. column-major, the layout the kernel is used with everywhere.
* ``reference``: a float64 matrix product rounded to int32. Exact: every product is at most
  255 * 128 < 2^15 and every partial sum below 2^31 < 2^53, so float64 adds no rounding.
  This is the CPU path, and the oracle the CUDA kernel is tested against.

Operand ranges: weights use the symmetric signed grid (|code| <= 127 at 8 bits) and fit int8.
Activations behind a ReLU use the unsigned grid [0, 2^k - 1]; at k = 8 that is [0, 255], beyond
int8, so those codes are shifted by a zero point of 128 and the shift is added back exactly:
a . w = (a - 128) . w + 128 * sum(w). Zero padding of a convolution happens before the shift,
so a padded position is 0 in the unsigned domain as it must be. The accumulator is exact in
int32 while k * 255 * 127 < 2^31 (``MAX_INNER``, k <= 66,306; ResNet-50's largest im2col row
has 4,608); a longer inner dimension is refused and the layer stays on fake quantization.

Compared with the fake-quant forward, acc is the same sum without intermediate rounding: on
integer grids with power-of-two scales (and partial sums below 2^24 steps) the two are
bit-identical; with general scales they differ only by float32 rounding (the fake path rounds
each scaled operand and each addition of its float32 accumulation, this path rounds acc, the
scale product, and the bias addition once each), bounded by (k + 8) * 2^-24 * sum|terms|.

Selection (``int8_mode``): ``auto`` (default) uses the integer path on CUDA devices where the
kernel runs (probed once per device), ``always`` everywhere (CPU through the reference backend:
tests), ``never`` nowhere. Pure torch, no Flower import.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn import functional

MODES: tuple[str, ...] = ("auto", "always", "never")
#: inner sizes whose int32 accumulation is exact for unsigned 8-bit x signed 8-bit codes.
MAX_INNER = (2**31 - 1) // (255 * 127)
#: zero point of unsigned 8-bit activation codes ([0, 255] -> [-128, 127]).
UNSIGNED_OFFSET = 128

_mode = "auto"
_kernel_ok: dict[str, bool] = {}


def set_int8_mode(mode: str) -> None:
    """Choose where low-bit layers run integer products (module docstring)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"int8 mode must be one of {MODES}, got {mode!r}")
    _mode = mode


def get_int8_mode() -> str:
    return _mode


@contextmanager
def int8_mode(mode: str) -> Iterator[None]:
    previous = _mode
    set_int8_mode(mode)
    try:
        yield
    finally:
        set_int8_mode(previous)


def cuda_kernel_available(device: torch.device) -> bool:
    """Whether ``torch._int_mm`` runs on ``device`` (a CUDA device), probed once per device on
    the padded shapes this module uses and checked against the reference."""
    if device.type != "cuda" or not hasattr(torch, "_int_mm"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    name = f"cuda:{index}"
    if name not in _kernel_ok:
        try:
            gen = torch.Generator().manual_seed(0)
            a = torch.randint(-128, 128, (5, 12), generator=gen, dtype=torch.int8)
            w = torch.randint(-127, 128, (3, 12), generator=gen, dtype=torch.int8)
            got = _cuda_int_mm(a.to(name), w.to(name)).cpu()
            _kernel_ok[name] = bool(torch.equal(got, _reference_int_mm(a, w)))
        except (RuntimeError, NotImplementedError):
            _kernel_ok[name] = False
    return _kernel_ok[name]


def use_integer_path(device: torch.device) -> bool:
    """Whether a low-bit layer on ``device`` should compute its product on integer codes."""
    if _mode == "never":
        return False
    if _mode == "always":
        return True
    return cuda_kernel_available(device)


# --------------------------------------------------------------------------- int8 GEMM
def _reference_int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w^T in float64, exact for int8 operands and inner sizes up to 2^53 / 2^15."""
    return (a.to(torch.float64) @ w.to(torch.float64).t()).to(torch.int32)


def _cuda_int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ w^T through ``torch._int_mm``, zero-padded to its shape constraints."""
    m, k = a.shape
    n = w.shape[0]
    pad_m, pad_k, pad_n = max(0, 17 - m), (-k) % 8, (-n) % 8
    if pad_m or pad_k:
        a = functional.pad(a, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        w = functional.pad(w, (0, pad_k, 0, pad_n))
    out = torch._int_mm(a.contiguous(), w.contiguous().t())
    return out[:m, :n] if (pad_m or pad_n) else out


def int8_matmul(a: torch.Tensor, w: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``a @ w.T`` of int8 matrices a (m, k) and w (n, k), as int32 (m, n).

    ``backend``: ``cuda`` (``torch._int_mm``), ``reference`` (exact float64), or ``auto``: the
    kernel for CUDA tensors where it runs, else the reference.
    """
    if a.dtype != torch.int8 or w.dtype != torch.int8:
        raise TypeError(f"int8 operands expected, got {a.dtype} and {w.dtype}")
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"shapes {tuple(a.shape)} and {tuple(w.shape)} do not multiply as a @ w.T")
    if backend == "auto":
        backend = "cuda" if a.is_cuda and cuda_kernel_available(a.device) else "reference"
    if backend == "cuda":
        return _cuda_int_mm(a, w)
    if backend == "reference":
        return _reference_int_mm(a, w)
    raise ValueError(f"backend must be 'auto', 'cuda' or 'reference', got {backend!r}")


# --------------------------------------------------------------------------- layers
def activation_offset(bits: int, signed: bool) -> int:
    """Zero point that brings activation codes into int8: 128 for unsigned 8-bit, else 0."""
    if bits > 8:
        raise ValueError(f"integer products take codes of at most 8 bits, got {bits}")
    return UNSIGNED_OFFSET if not signed and bits == 8 else 0


def _to_int8(codes: torch.Tensor, offset: int) -> torch.Tensor:
    """Integer-valued float codes (minus the zero point) as int8."""
    if offset:
        codes = codes - offset
    return codes.to(torch.int8)


def _accumulate(rows: torch.Tensor, w_codes: torch.Tensor, offset: int) -> torch.Tensor:
    """int32 (m, n) of rows (m, k, float codes) against weights (n, k, float codes)."""
    if rows.shape[1] > MAX_INNER:
        raise ValueError(f"inner size {rows.shape[1]} > {MAX_INNER}: int32 could overflow")
    w8 = w_codes.to(torch.int8)
    acc = int8_matmul(_to_int8(rows, offset).contiguous(), w8.contiguous())
    if offset:
        acc = acc + offset * w8.sum(dim=1, dtype=torch.int32)
    return acc


def int_linear(x_codes: torch.Tensor, w_codes: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Exact int32 ``x_codes @ w_codes.T`` for float tensors holding integer codes: x (..., k)
    (activations, unsigned ones shifted by ``offset``), w (n, k) (weights)."""
    lead = x_codes.shape[:-1]
    acc = _accumulate(x_codes.reshape(-1, x_codes.shape[-1]), w_codes, offset)
    return acc.reshape(*lead, w_codes.shape[0])


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def int_conv2d(
    x_codes: torch.Tensor,
    w_codes: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    offset: int = 0,
) -> torch.Tensor:
    """Exact int32 conv2d (groups = 1, zero padding) of integer codes via im2col.

    x (N, C, H, W) and w (O, C, kh, kw) are float tensors holding integer codes. ``unfold`` has
    no integer kernels, so the patches are gathered in float (float16 on CUDA: exact for codes
    up to 2048) and converted to int8 after the zero point is subtracted.
    """
    n, _, h, width = x_codes.shape
    out_channels, _, kh, kw = w_codes.shape
    work = x_codes.to(torch.float16) if x_codes.is_cuda else x_codes
    patches = functional.unfold(work, (kh, kw), dilation=dilation, padding=padding, stride=stride)
    rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N * L, C * kh * kw)
    acc = _accumulate(rows, w_codes.reshape(out_channels, -1), offset)
    oh = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    ow = conv_output_size(width, kw, stride[1], padding[1], dilation[1])
    return acc.reshape(n, oh * ow, out_channels).transpose(1, 2).reshape(n, out_channels, oh, ow)


def dequantize_output(
    acc: torch.Tensor,
    activation_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    channel_dim: int,
) -> torch.Tensor:
    """acc * (s_a * s_w) + bias in float32; s_w is one scale or one per output channel
    (any shape holding that many elements), laid along ``channel_dim`` of acc."""
    scale = (activation_scale.to(torch.float32) * weight_scale.to(torch.float32)).reshape(-1)
    shape = [1] * acc.dim()
    shape[channel_dim] = scale.numel()
    y = acc.to(torch.float32) * scale.reshape(shape)
    if bias is not None:
        shape[channel_dim] = bias.numel()
        y = y + bias.reshape(shape)
    return y
