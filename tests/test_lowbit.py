"""LBI-FL low-bit training ops and weight codec: grids, gradients, Eq. 5, BitOPs, wire bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional

from compression import lbi_codec
from compression.layout import SplitLayout
from compression.lowbit import (
    FP32,
    INT8,
    BitWidths,
    LowBitConv2d,
    convert_to_lowbit,
    layer_macs,
    lowbit_layers,
    quantization_loss,
    quantization_losses,
    quantize_stochastic,
    reset_statistics,
    set_bit_widths,
    training_bitops,
)
from compression.packing import packed_size


def lowbit_conv(widths: BitWidths, **kwargs) -> LowBitConv2d:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, **kwargs))
    convert_to_lowbit(model, "conv")
    set_bit_widths(model, widths)
    layer = model[0]
    assert isinstance(layer, LowBitConv2d)
    return layer


def hand_quantize(x: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Reference: max-abs scale, nearest rounding, clamp; written independently of the module."""
    top = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    scale = x.abs().max() / top
    return torch.clamp(torch.round(x / scale), -top if signed else 0, top) * scale


def hand_quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference for weights: the same, one scale per output channel."""
    return torch.stack([hand_quantize(channel, bits, True) for channel in w])


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_forward_equals_convolution_of_grid_values(bits: int) -> None:
    layer = lowbit_conv(BitWidths(bits, bits, 8), bias=True)
    x = torch.randn(4, 3, 6, 6)
    y = layer(x)  # training mode: scales taken at this first step
    expected = functional.conv2d(
        hand_quantize(x, bits, True),
        hand_quantize_weight(layer.weight.detach(), bits),
        layer.bias.detach(),
        padding=1,
    )
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    codes = layer.weight.detach() / layer.weight_scale
    assert torch.allclose(
        torch.round(codes).clamp(-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1), torch.round(codes)
    )


def test_non_negative_activations_use_the_unsigned_grid() -> None:
    layer = lowbit_conv(BitWidths(8, 4, 8))
    x = torch.rand(2, 3, 5, 5)  # >= 0, as behind a ReLU
    y = layer(x)
    assert not layer.activation_signed
    expected = functional.conv2d(
        hand_quantize(x, 4, False),
        hand_quantize_weight(layer.weight.detach(), 8),
        layer.bias.detach(),
        padding=1,
    )
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    levels = torch.unique(torch.round(hand_quantize(x, 4, False) / (x.max() / 15)))
    assert len(levels) <= 16  # 4 bits, no level wasted on negative values


def test_full_precision_widths_reproduce_the_float_layer() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    reference = [p.detach().clone() for p in model.parameters()]
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    convert_to_lowbit(model)
    assert list(model.state_dict()) == keys  # the wire format is the float model's
    assert all(torch.equal(a, b) for a, b in zip(reference, model.parameters(), strict=True))
    assert len(list(lowbit_layers(model))) == 2
    set_bit_widths(model, FP32)
    torch.testing.assert_close(model(x), expected)


def test_backward_gradients_use_the_quantized_output_gradient() -> None:
    """dL/dw and dL/dx are the convolution backward of (Q(x), Q(w)) and the k_g-bit gradient."""
    layer = lowbit_conv(BitWidths(4, 6, 4), bias=False)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    upstream = torch.randn(2, 5, 5, 5)
    captured: list[torch.Tensor] = []
    y = layer(x)
    y.register_hook(lambda g: captured.append(g))  # the gradient arriving at the layer output
    torch.manual_seed(7)
    y.backward(upstream)
    torch.manual_seed(7)
    g_q = quantize_stochastic(upstream, 4)  # the same draw the layer made
    top = 2**3 - 1
    scale = upstream.abs().max() / top
    assert torch.allclose(g_q / scale, torch.round(g_q / scale), atol=1e-4)  # on the grid
    assert float((g_q / scale).abs().max()) <= top + 1e-4
    q_x = hand_quantize(x.detach(), 6, True)
    q_w = hand_quantize_weight(layer.weight.detach(), 4)
    grad_w = torch.nn.grad.conv2d_weight(q_x, q_w.shape, g_q, padding=1)
    grad_x = torch.nn.grad.conv2d_input(x.shape, q_w, g_q, padding=1)
    torch.testing.assert_close(layer.weight.grad, grad_w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, grad_x, rtol=1e-4, atol=1e-5)  # straight-through to x
    assert torch.equal(captured[0], upstream)


def test_stochastic_gradient_quantization_is_unbiased_within_three_sigma() -> None:
    torch.manual_seed(3)
    g = torch.randn(400) * 1e-3
    draws = 2000
    generator = torch.Generator().manual_seed(11)
    total = torch.zeros_like(g, dtype=torch.float64)
    for _ in range(draws):
        total += quantize_stochastic(g, 4, generator).double()
    mean = total / draws
    scale = float(g.abs().max()) / 7
    frac = (g / scale - torch.floor(g / scale)).double()
    sigma = scale * torch.sqrt(frac * (1 - frac) / draws)  # exact per-element std of the mean
    error = (mean - g.double()).abs()
    # Each element within 3 sigma, save the ~0.3% a normal tail allows (1% here).
    assert float((error > 3 * sigma + 1e-12).float().mean()) < 0.01
    # The aggregate: the mean error over all elements within 3 sigma of zero.
    aggregate_sigma = float(torch.sqrt((sigma**2).sum())) / len(g)
    assert abs(float((mean - g.double()).mean())) <= 3 * aggregate_sigma


def test_quantization_loss_is_equation_5() -> None:
    original = torch.tensor([1.0, -2.0, 3.0])
    quantized = torch.tensor([1.0, -2.5, 2.0])
    assert float(quantization_loss(original, quantized)) == pytest.approx(abs(6.0 - 5.5) / 6.0)
    assert float(quantization_loss(torch.zeros(3), torch.zeros(3))) == 0.0


def test_quantization_losses_average_per_kind_over_layers_and_steps() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3))
    convert_to_lowbit(model)
    set_bit_widths(model, BitWidths(4, 8, 6))
    x = torch.randn(8, 1, 5, 5)
    model(x).sum().backward()
    losses = quantization_losses(model)
    layers = [layer for _, layer in lowbit_layers(model)]
    expected_w = np.mean(
        [
            float(
                quantization_loss(
                    layer.weight.detach(), hand_quantize_weight(layer.weight.detach(), 4)
                )
            )
            for layer in layers
        ]
    )
    assert losses["weight"] == pytest.approx(expected_w, rel=1e-5)
    assert losses["activation"] > 0 and losses["gradient"] > 0
    reset_statistics(model)
    assert quantization_losses(model) == {"weight": 0.0, "activation": 0.0, "gradient": 0.0}
    set_bit_widths(model, FP32)
    model(x).sum().backward()
    assert quantization_losses(model) == {"weight": 0.0, "activation": 0.0, "gradient": 0.0}


def activation_scales(widen: str) -> tuple[list[float], list[float]]:
    model = nn.Sequential(nn.Linear(4, 2))
    convert_to_lowbit(model, refresh_interval=3, widen=widen)
    set_bit_widths(model, INT8)
    layer = model[0]
    torch.manual_seed(0)
    batches = [torch.randn(5, 4) * m for m in (1.0, 3.0, 0.5, 0.5, 0.2, 4.0)]
    scales = []
    for batch in batches:
        model(batch).sum().backward()
        scales.append(float(layer.activation_scale))
    return scales, [float(b.abs().max()) / 127 for b in batches]


def test_scales_refresh_on_the_interval_and_only_grow_in_between() -> None:
    scales, peak = activation_scales("all")
    assert scales[0] == pytest.approx(peak[0])  # refresh
    assert scales[1] == pytest.approx(peak[1])  # outgrew: widened at once, never clipped
    assert scales[2] == scales[1]  # smaller batch: kept until the next refresh
    assert scales[3] == pytest.approx(peak[3])  # refresh: shrinks to the current batch
    assert scales[4] == scales[3] and scales[5] == pytest.approx(peak[5])


def test_by_default_activation_scales_stay_until_the_refresh() -> None:
    """Activations keep the scale of the refresh step (outliers are clipped until the next)."""
    scales, peak = activation_scales("weights")
    assert scales[0] == scales[1] == scales[2] == pytest.approx(peak[0])
    assert scales[3] == scales[4] == scales[5] == pytest.approx(peak[3])


def test_bitops_of_known_layers_equal_the_hand_count() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # out 8x10x10: 100 * 8 * (3*3*3) = 21,600 MACs
        nn.Conv2d(8, 6, 3, stride=2, groups=2),  # out 6x4x4: 16 * 6 * (4*3*3) = 3,456
        nn.Flatten(),
        nn.Linear(96, 5),  # 480
    )
    convert_to_lowbit(model)
    macs = layer_macs(model, (3, 10, 10))
    assert macs == {"0": 21_600, "1": 3_456, "3": 480}
    widths = BitWidths(4, 6, 8)
    assert training_bitops(21_600, widths) == 21_600 * (4 * 6 + 8 * 4 + 8 * 6)
    assert training_bitops(1, FP32) == 32 * 32 * 3  # the paper's full-precision count
    assert training_bitops(1, INT8) == 4 * training_bitops(1, BitWidths(4, 4, 4))


def test_bit_widths_validate() -> None:
    with pytest.raises(ValueError, match="weight bit-width"):
        BitWidths(1, 4, 4)
    with pytest.raises(ValueError, match="gradient bit-width"):
        BitWidths(4, 4, 20)
    assert BitWidths(4, 4, 4).replace("gradient", 6) == BitWidths(4, 4, 6)


# ----------------------------------------------------------------------- weight codec
SPLIT = SplitLayout(quantized_shapes=((4, 3, 3, 3), (10, 7)), extra_shapes=((4,), (10,)))


def codec_message(bits: int, rounding: str = "nearest") -> tuple[list, list[np.ndarray]]:
    rng = np.random.default_rng(bits)
    tensors = [rng.normal(size=s).astype(np.float32) for s in SPLIT.quantized_shapes]
    codes, scales = lbi_codec.quantize_weights(
        tensors, bits, rounding, torch.Generator().manual_seed(1)
    )
    extras = rng.normal(size=14).astype(np.float16)
    return encode(SPLIT, codes, scales, extras, bits), tensors


def encode(split, codes, scales, extras, bits) -> list[np.ndarray]:
    message = lbi_codec.WeightMessage(bits, codes, scales, extras)
    return lbi_codec.LBIWeightCodec(split).encode(message)


def decode(arrays, split):
    """The received message and the weights it stands for."""
    message = lbi_codec.LBIWeightCodec(split).decode(arrays)
    return message, lbi_codec.dequantize(message, split)


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_codec_round_trip_and_byte_count(bits: int) -> None:
    arrays, tensors = codec_message(bits)
    message, weights = decode(arrays, SPLIT)
    assert message.bits == bits
    for tensor, decoded in zip(tensors, weights, strict=True):
        np.testing.assert_allclose(
            decoded, hand_quantize_weight(torch.from_numpy(tensor), bits), rtol=1e-6, atol=1e-7
        )
    nbytes = sum(a.nbytes for a in arrays)
    assert nbytes == lbi_codec.LBIWeightCodec(SPLIT).payload_nbytes(message)
    assert arrays[0].nbytes == packed_size(108 + 70, bits)


def test_codec_stochastic_rounding_is_unbiased() -> None:
    tensor = np.linspace(-1, 1, 201, dtype=np.float32).reshape(1, 201)
    split = SplitLayout(quantized_shapes=((1, 201),), extra_shapes=())
    total = np.zeros(201)
    draws = 400
    generator = torch.Generator().manual_seed(5)
    for _ in range(draws):
        codes, scales = lbi_codec.quantize_weights([tensor], 4, "stochastic", generator)
        arrays = encode(split, codes, scales, np.zeros(0, np.float16), 4)
        total += decode(arrays, split)[1][0][0]
    step = 1 / 7  # one channel: max|w| = 1
    # per-element std of the mean <= step / (2 sqrt(draws)); 4.5 sigma over 201 elements
    assert np.max(np.abs(total / draws - tensor[0])) <= 4.5 * step / (2 * np.sqrt(draws))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda a: [a[0], np.concatenate([[5.5], a[1][1:]]).astype(np.float32), a[2]], "integer"),
        (lambda a: [a[0], np.concatenate([[9.0], a[1][1:]]).astype(np.float32), a[2]], "2..8"),
        (lambda a: [a[0], a[1] * -1, a[2]], "2..8|positive"),
        (lambda a: [np.full_like(a[0], 0xFF), a[1], a[2]], "outside"),
        (lambda a: [a[0][:-1], a[1], a[2]], "bytes|expected"),
        (lambda a: [a[0], a[1], a[2].astype(np.float64)], "extras"),
        (lambda a: a[:2], "3 arrays"),
    ],
)
def test_codec_rejects_malformed_messages(mutate, reason: str) -> None:
    arrays, _ = codec_message(4)
    with pytest.raises(ValueError, match=reason):
        decode(mutate(arrays), SPLIT)


def test_stale_scales_without_widening_and_per_tensor_weight_scales() -> None:
    """widen="none" keeps a scale until the next refresh (the paper); per_channel=False takes
    one max-abs scale for the whole weight tensor."""
    for widen in ("weights", "none"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 4))
        convert_to_lowbit(model, "conv-linear", refresh_interval=10, widen=widen)
        set_bit_widths(model, BitWidths(4, 4, 4))
        layer = model[0]
        x = torch.randn(8, 6)
        model(x).sum().backward()  # step 0: scales taken
        taken = layer.weight_scale.clone()
        with torch.no_grad():
            layer.weight.mul_(3.0)  # outgrow the scale between refreshes
        model(x).sum().backward()
        if widen == "weights":
            torch.testing.assert_close(layer.weight_scale, 3.0 * taken)
        else:
            torch.testing.assert_close(layer.weight_scale, taken)
    model = nn.Sequential(nn.Linear(6, 4))
    convert_to_lowbit(model, "conv-linear", per_channel=False)
    set_bit_widths(model, BitWidths(4, 4, 4))
    model(torch.randn(8, 6)).sum().backward()
    layer = model[0]
    assert layer.weight_scale.numel() == 1
    torch.testing.assert_close(layer.weight_scale, layer.weight.detach().abs().max() / 7)


def test_codec_with_one_scale_per_tensor() -> None:
    rng = np.random.default_rng(2)
    tensors = [rng.normal(size=s).astype(np.float32) for s in SPLIT.quantized_shapes]
    codes, scales = lbi_codec.quantize_weights(tensors, 4, "nearest", per_channel=False)
    assert scales.shape == (2,)
    np.testing.assert_allclose(scales, [np.abs(t).max() / 7 for t in tensors], rtol=1e-6)
    codec = lbi_codec.LBIWeightCodec(SPLIT, per_channel=False)
    message = lbi_codec.WeightMessage(4, codes, scales, np.zeros(14, np.float16))
    arrays = codec.encode(message)
    assert arrays[1].shape == (3,) and codec.payload_nbytes(message) == sum(
        a.nbytes for a in arrays
    )
    weights = lbi_codec.dequantize(codec.decode(arrays), SPLIT)
    for tensor, got, scale in zip(tensors, weights, scales, strict=True):
        np.testing.assert_allclose(got, np.clip(np.rint(tensor / scale), -7, 7) * scale, rtol=1e-6)
    with pytest.raises(ValueError, match="width/scales"):
        lbi_codec.LBIWeightCodec(SPLIT).decode(arrays)  # a per-channel receiver refuses it
