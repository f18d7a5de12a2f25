"""Low-bit integerized training ops of LBI-FL: INT4/6/8 weights, activations and gradients.

A quantized layer (``LowBitConv2d``, ``LowBitLinear``) computes, for bit-widths (k_w, k_a, k_g):

    forward    y = op(Q_n(a; s_a, k_a), Q_n(w; s_w, k_w)) + bias   (s_w: one per output channel)
    backward   dL/dy is replaced by Q_s(dL/dy; max|dL/dy|, k_g) before the two backward products
               dL/da = op^T(Q_s(dL/dy), Q_n(w))  and  dL/dw = op^T(Q_s(dL/dy), Q_n(a))

so all three products of a training step take integer operands, as in the low-bit training
methods LBI-FL builds on (Zhu et al. 2020; Zhao et al. 2021). ``Q_n`` is symmetric nearest
rounding (paper Eq. 2) with a straight-through gradient; ``Q_s`` is stochastic rounding
(Eq. 3), unbiased: E[Q_s(g)] = g; both, and the grids and scales, are
``compression.primitives``. Activations whose minimum was non-negative when their scale
was taken (inputs behind a ReLU) use the unsigned grid [0, 2^k - 1] (Eq. 1 with zero point 0), so
a ReLU output does not waste the sign bit. Biases are added in full precision (an integer kernel
keeps them in its int32 accumulator). Bit-width 32 means "not quantized" (the FP32 mode).

Scales: weight and activation scales are max-abs scales re-taken every ``refresh_interval``
training steps (the paper refreshes every 100 iterations); in between they are reused, and
``widen`` (``WIDENINGS``) says which may grow at once when a tensor outgrows its scale:
``none`` (default): the paper's stale scales, values beyond them clipped (and, through the
clipped straight-through gradient of ``fake_quantize``, not pushed further out); ``weights``: a
weight that outgrows its scale widens it, activations keep theirs; ``all``: both widen. Measured
on digits (INT4, Dirichlet 0.5, 10 clients, 30 rounds, seeds 0-9): ``none`` 99.06 +- 0.27%,
``weights`` 98.53 +- 1.21%, ``all`` 88.44 +- 10.57% (INT8: 99.14 +- 0.53%): a growing activation
scale lets one outlier batch stretch the 15-level unsigned grid until most ReLU outputs round
to zero. Weight scales are one per output channel
(``per_channel=True``, the default) or, as in the paper, one per tensor. The gradient
scale is taken from each backward's own max|dL/dy|, because gradient magnitudes move by orders of
magnitude between steps and a stale scale would clip or flush them to zero.

Which layers: every ``nn.Conv2d`` (``layers="conv"``, as the methods the paper follows) or every
Conv2d and ``nn.Linear`` (``"conv-linear"``, the default here: small models spend a large share
of their MACs in linear layers, and their weights travel at k_w bits anyway). Only modules whose
type is exactly Conv2d/Linear are converted (attention's fused projections are left alone).

Arithmetic is simulated in floating point (fake quantization) on the CPU: the values are exactly
those of integer arithmetic up to float32 accumulation. On CUDA, where weights and activations
are at most 8 bits wide, the forward product runs on the integer codes ``round(x / s)``
instead (``compression.int8_matmul``: ``torch._int_mm``, conv via im2col; exact int32
accumulation, rescaled by ``s_a * s_w``), chosen automatically (``int8_matmul.int8_mode``
switches it); its backward is the fake-quant path's, so training is unchanged. Grouped convs,
non-zero padding modes and string paddings stay on fake quantization.

Accounting: ``quantization_losses`` gives Eq. 5, |sum|x_f| - sum|x_q|| / sum|x_f|, per tensor
kind averaged over layers and steps; ``layer_macs`` and ``training_bitops`` give BitOPs as the
paper counts them: a MAC of a k_w-bit and a k_a-bit operand costs k_w * k_a, and a training step
costs forward + the two backward products, MACs * (k_w k_a + k_g k_w + k_g k_a) (the paper treats
the backward convolutions as the same size as the forward one; FP32 = 32 * 32 * 3 per MAC).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from compression.int8_matmul import (
    MAX_INNER,
    activation_offset,
    dequantize_output,
    int_conv2d,
    int_linear,
    use_integer_path,
)
from compression.primitives import (
    channel_scale,
    fake_quantize,
    max_abs_scale,
    quantize_nearest,
    quantize_stochastic,
)

KINDS: tuple[str, ...] = ("weight", "activation", "gradient")
#: which scales grow at once between refreshes (module docstring).
WIDENINGS: tuple[str, ...] = ("weights", "none", "all")
LAYER_CHOICES: tuple[str, ...] = ("conv", "conv-linear")
#: a width of 32 leaves that tensor kind in full precision.
FULL_PRECISION_BITS = 32
#: widths of weights and activations whose codes fit the int8 kernels.
INTEGER_BITS = 8


@dataclass(frozen=True)
class BitWidths:
    """Bit-widths of weights, activations and gradients (2..16, or 32 = not quantized)."""

    weight: int
    activation: int
    gradient: int

    def __post_init__(self) -> None:
        for kind in KINDS:
            bits = getattr(self, kind)
            if not (isinstance(bits, int) and (2 <= bits <= 16 or bits == FULL_PRECISION_BITS)):
                raise ValueError(f"{kind} bit-width must be in 2..16 or 32, got {bits!r}")

    def get(self, kind: str) -> int:
        if kind not in KINDS:
            raise KeyError(f"unknown tensor kind {kind!r}; valid: {KINDS}")
        return getattr(self, kind)

    def replace(self, kind: str, bits: int) -> BitWidths:
        if kind not in KINDS:
            raise KeyError(f"unknown tensor kind {kind!r}; valid: {KINDS}")
        return dataclasses.replace(self, **{kind: bits})

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.weight, self.activation, self.gradient)

    @property
    def full_precision(self) -> bool:
        return all(bits == FULL_PRECISION_BITS for bits in self.as_tuple())


INT4 = BitWidths(4, 4, 4)
INT8 = BitWidths(8, 8, 8)
FP32 = BitWidths(32, 32, 32)


# --------------------------------------------------------------------------- statistics
def quantization_loss(original: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Eq. 5: |sum|x_f| - sum|x_q|| / sum|x_f| (0 for an all-zero tensor)."""
    total = original.abs().sum()
    diff = (total - quantized.abs().sum()).abs()
    return torch.where(total > 0, diff / total, torch.zeros_like(total))


class _QuantizeGradient(torch.autograd.Function):
    """Identity forward; the backward replaces dL/dy with its k_g-bit stochastic quantization."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, bits: int, layer: _LowBitMixin) -> torch.Tensor:
        ctx.bits = bits
        ctx.layer = layer
        # A copy, not a view: the next module may be an in-place ReLU.
        return y.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        quantized = quantize_stochastic(grad, ctx.bits)
        ctx.layer._record("gradient", grad, quantized)
        return quantized, None, None


# --------------------------------------------------------------------------- layers
class _LowBitMixin(nn.Module):
    """What Conv2d and Linear share: widths, cached scales, Eq. 5 statistics."""

    bits: BitWidths
    refresh_interval: int
    widen: str
    per_channel: bool

    def _init_lowbit(self, refresh_interval: int, widen: str, per_channel: bool) -> None:
        if refresh_interval < 1:
            raise ValueError(f"refresh_interval must be >= 1, got {refresh_interval}")
        if widen not in WIDENINGS:
            raise ValueError(f"widen must be one of {WIDENINGS}, got {widen!r}")
        self.refresh_interval = refresh_interval
        self.widen = widen
        self.per_channel = per_channel
        # Non-persistent: the state_dict (and so the wire format) is that of the float model.
        self.register_buffer("weight_scale", torch.ones(()), persistent=False)
        self.register_buffer("activation_scale", torch.ones(()), persistent=False)
        self.reset_lowbit()

    def reset_lowbit(self) -> None:
        """Back to the just-converted state: FP32 widths, no steps, unit scales, no statistics."""
        self.bits = FP32
        self.steps = 0
        self.weight_scale = torch.ones((), device=self.weight.device)
        self.activation_scale = torch.ones((), device=self.weight.device)
        self.activation_signed = True
        self.reset_statistics()

    def reset_statistics(self) -> None:
        self.loss_sums: dict[str, torch.Tensor | float] = {kind: 0.0 for kind in KINDS}
        self.loss_counts: dict[str, int] = {kind: 0 for kind in KINDS}

    def _record(self, kind: str, original: torch.Tensor, quantized: torch.Tensor) -> None:
        with torch.no_grad():
            # Kept as a tensor: no host sync per step on CUDA.
            self.loss_sums[kind] = self.loss_sums[kind] + quantization_loss(original, quantized)
        self.loss_counts[kind] += 1

    def weight_scales(self, bits: int) -> torch.Tensor:
        """Max-abs scales of the current weights: per output channel, or one for the tensor."""
        if self.per_channel:
            return channel_scale(self.weight, bits)
        return max_abs_scale(self.weight, bits, signed=True)

    def _update_scales(self, x: torch.Tensor, refresh: bool) -> None:
        """Re-take the max-abs scales on a refresh step; in between, let the kinds ``widen``
        names grow and keep the others (module docstring). ``torch.maximum`` keeps this free of
        host syncs; the activation's signedness (a Python bool that picks the grid) is only
        re-read on refresh steps."""
        widen_weights = refresh or self.widen in ("weights", "all")
        widen_activations = refresh or self.widen == "all"
        with torch.no_grad():
            if self.bits.weight != FULL_PRECISION_BITS and widen_weights:
                scale = self.weight_scales(self.bits.weight)
                self.weight_scale = scale if refresh else torch.maximum(self.weight_scale, scale)
            if self.bits.activation != FULL_PRECISION_BITS and widen_activations:
                if refresh:
                    self.activation_signed = bool(x.amin() < 0)
                scale = max_abs_scale(x, self.bits.activation, self.activation_signed)
                self.activation_scale = (
                    scale if refresh else torch.maximum(self.activation_scale, scale)
                )

    def _product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's own op (conv or matmul) plus bias, in floating point."""
        raise NotImplementedError

    def _integer_supported(self) -> bool:
        """Whether this layer's product has an integer form (``compression.int8_matmul``)."""
        raise NotImplementedError

    def _integer_accumulate(
        self, x_codes: torch.Tensor, w_codes: torch.Tensor, offset: int
    ) -> torch.Tensor:
        """The exact int32 product of activation and weight codes (no scale, no bias)."""
        raise NotImplementedError

    def _product_backward(
        self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs: tuple[bool, ...]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Gradients of ``_product(x, weight)`` (input, weight, bias) for the output's ``grad``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.bits
        if bits.full_precision:
            return self._product(x, self.weight)
        training = self.training and torch.is_grad_enabled()
        if training:
            self._update_scales(x, refresh=self.steps % self.refresh_interval == 0)
            self.steps += 1
        weight_scale, activation_scale, signed = self._scales(x, training)
        raw = x
        weight = self.weight
        if bits.weight != FULL_PRECISION_BITS:
            weight = fake_quantize(weight, weight_scale, bits.weight, signed=True)
            if training:
                self._record("weight", self.weight, weight)
        if bits.activation != FULL_PRECISION_BITS:
            quantized = fake_quantize(x, activation_scale, bits.activation, signed)
            if training:
                self._record("activation", x, quantized)
            x = quantized
        if (
            bits.weight <= INTEGER_BITS
            and bits.activation <= INTEGER_BITS
            and self._integer_supported()
            and use_integer_path(x.device)
        ):
            # The same codes fake_quantize rounded to; the product runs on them as integers.
            w_codes = quantize_nearest(self.weight.detach(), weight_scale, bits.weight, True)
            x_codes = quantize_nearest(raw.detach(), activation_scale, bits.activation, signed)
            y = _IntegerProduct.apply(
                x,
                weight,
                self.bias,
                self,
                x_codes,
                w_codes,
                activation_scale,
                weight_scale,
                activation_offset(bits.activation, signed),
            )
        else:
            y = self._product(x, weight)
        if training and bits.gradient != FULL_PRECISION_BITS:
            y = _QuantizeGradient.apply(y, bits.gradient, self)
        return y

    def _scales(self, x: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Cached scales in training; in evaluation, fresh ones (the weights no longer move, and
        a model never trained here has no cached activation scale)."""
        if training:
            return self.weight_scale, self.activation_scale, self.activation_signed
        signed = bool(x.detach().amin() < 0)
        return (
            self.weight_scales(self.bits.weight),
            max_abs_scale(x, self.bits.activation, signed),
            signed,
        )


class _IntegerProduct(torch.autograd.Function):
    """Forward: the layer's product on integer codes, rescaled (``compression.int8_matmul``).
    Backward: the gradients of the fake-quant product ``_product(x_q, w_q)``, so training
    (the straight-through estimator of ``fake_quantize`` included) is that of the float path."""

    @staticmethod
    def forward(
        ctx,
        x_q: torch.Tensor,
        w_q: torch.Tensor,
        bias: torch.Tensor | None,
        layer: _LowBitMixin,
        x_codes: torch.Tensor,
        w_codes: torch.Tensor,
        activation_scale: torch.Tensor,
        weight_scale: torch.Tensor,
        offset: int,
    ) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x_q, w_q)
        acc = layer._integer_accumulate(x_codes, w_codes, offset)
        channel_dim = 1 if isinstance(layer, nn.Conv2d) else acc.dim() - 1
        return dequantize_output(acc, activation_scale, weight_scale, bias, channel_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_q, w_q = ctx.saved_tensors
        grads = ctx.layer._product_backward(grad, x_q, w_q, tuple(ctx.needs_input_grad[:3]))
        return (*grads, None, None, None, None, None, None)


class LowBitConv2d(nn.Conv2d, _LowBitMixin):
    """``nn.Conv2d`` computing on quantized weights/activations with quantized output gradients."""

    def _product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, self.bias)

    def _integer_supported(self) -> bool:
        return (
            self.groups == 1
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and self.weight[0].numel() <= MAX_INNER
        )

    def _integer_accumulate(
        self, x_codes: torch.Tensor, w_codes: torch.Tensor, offset: int
    ) -> torch.Tensor:
        return int_conv2d(x_codes, w_codes, self.stride, self.padding, self.dilation, offset)

    def _product_backward(
        self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs: tuple[bool, ...]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad,
            x,
            weight,
            None if self.bias is None else [self.out_channels],
            self.stride,
            self.padding,
            self.dilation,
            False,
            [0, 0],
            self.groups,
            [needs[0], needs[1], needs[2] and self.bias is not None],
        )
        return grad_x, grad_w, grad_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LowBitMixin.forward(self, x)


class LowBitLinear(nn.Linear, _LowBitMixin):
    """``nn.Linear`` counterpart of ``LowBitConv2d``."""

    def _product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return functional.linear(x, weight, self.bias)

    def _integer_supported(self) -> bool:
        return self.in_features <= MAX_INNER

    def _integer_accumulate(
        self, x_codes: torch.Tensor, w_codes: torch.Tensor, offset: int
    ) -> torch.Tensor:
        return int_linear(x_codes, w_codes, offset)

    def _product_backward(
        self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, needs: tuple[bool, ...]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        # As autograd differentiates ``linear`` = addmm(bias, x, weight^T).
        grad_2d = grad.reshape(-1, grad.shape[-1])
        x_2d = x.reshape(-1, x.shape[-1])
        grad_x = grad_2d.mm(weight).reshape(x.shape) if needs[0] else None
        grad_w = x_2d.t().mm(grad_2d).t() if needs[1] else None
        grad_b = grad_2d.sum(0) if needs[2] and self.bias is not None else None
        return grad_x, grad_w, grad_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LowBitMixin.forward(self, x)


def _lowbit_copy(
    module: nn.Module, refresh_interval: int, widen: str, per_channel: bool
) -> nn.Module:
    """A low-bit layer that shares ``module``'s parameters (same state_dict keys and tensors)."""
    if type(module) is nn.Conv2d:
        new: nn.Module = LowBitConv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            device="meta",
        )
    else:
        new = LowBitLinear(
            module.in_features, module.out_features, bias=module.bias is not None, device="meta"
        )
    new.weight = module.weight
    new.bias = module.bias
    new.train(module.training)
    new._init_lowbit(refresh_interval, widen, per_channel)
    return new.to(module.weight.device)


def convert_to_lowbit(
    model: nn.Module,
    layers: str = "conv-linear",
    refresh_interval: int = 100,
    *,
    widen: str = "none",
    per_channel: bool = True,
) -> nn.Module:
    """Replace (in place) the model's Conv2d (and Linear) modules by low-bit ones; returns it.

    The new layers start in full precision (``FP32``) until ``set_bit_widths`` is called;
    ``widen`` and ``per_channel`` are the scale options of the module docstring.
    """
    if layers not in LAYER_CHOICES:
        raise ValueError(f"layers must be one of {LAYER_CHOICES}, got {layers!r}")
    targets = (nn.Conv2d, nn.Linear) if layers == "conv-linear" else (nn.Conv2d,)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in targets:
                setattr(parent, name, _lowbit_copy(child, refresh_interval, widen, per_channel))
    return model


def lowbit_layers(model: nn.Module) -> Iterator[tuple[str, _LowBitMixin]]:
    """The converted layers, by qualified name, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, _LowBitMixin):
            yield name, module


def set_bit_widths(model: nn.Module, widths: BitWidths) -> None:
    """Train and evaluate every low-bit layer at ``widths`` from now on; scales are re-taken at
    the next training step."""
    for _, layer in lowbit_layers(model):
        if layer.bits != widths:
            layer.bits = widths
            layer.steps = 0


def reset_lowbit_state(model: nn.Module) -> None:
    """Every low-bit layer back to its state right after ``convert_to_lowbit`` (widths, step
    count, cached scales, statistics): a model reused for another client (the ClientApp's
    worker cache) must not inherit the previous client's scales or refresh phase."""
    for _, layer in lowbit_layers(model):
        layer.reset_lowbit()


def reset_statistics(model: nn.Module) -> None:
    for _, layer in lowbit_layers(model):
        layer.reset_statistics()


def quantization_losses(model: nn.Module) -> dict[str, float]:
    """Eq. 5 per tensor kind: each layer's mean over its steps, then the mean over layers
    (Figure 2 of the paper plots this average); 0.0 for a kind nothing recorded."""
    result = {}
    for kind in KINDS:
        means = [
            float(layer.loss_sums[kind]) / layer.loss_counts[kind]
            for _, layer in lowbit_layers(model)
            if layer.loss_counts[kind]
        ]
        result[kind] = sum(means) / len(means) if means else 0.0
    return result


# --------------------------------------------------------------------------- BitOPs
def layer_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Forward multiply-accumulates per sample of every low-bit layer, measured with hooks on a
    one-sample forward pass (``input_shape`` without the batch dimension)."""
    macs: dict[str, int] = {}
    hooks = []

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                per_output = module.in_channels // module.groups * module.kernel_size[0]
                per_output *= module.kernel_size[1]
            else:
                per_output = module.in_features
            macs[name] = macs.get(name, 0) + output.numel() * per_output

        return hook

    for name, layer in lowbit_layers(model):
        hooks.append(layer.register_forward_hook(hook_for(name)))
    was_training = model.training
    device = next(model.parameters()).device
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    return macs


def training_bitops(macs: int, widths: BitWidths) -> int:
    """BitOPs of one training step (forward + two backward products) over ``macs`` MACs."""
    w, a, g = widths.as_tuple()
    return macs * (w * a + g * w + g * a)
