"""Integer products of LBI-FL's low-bit layers: exact int32 sums, equal to fake quantization.

On integer grids with power-of-two scales the integer path and the fake-quant float path compute
the same real number without rounding, so they must agree bit for bit. With general scales they
may differ by float32 rounding only: the fake path rounds each scaled operand (2 roundings per
term) and each of its k float32 additions, the integer path rounds acc to float32, the scale
product and the bias addition; so |y_int - y_fake| <= (k + 8) * 2^-24 * (sum|terms| + |bias|).
The CUDA kernel (``torch._int_mm``) is checked against the exact reference where CUDA exists.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import Parameters, parameters_to_ndarrays
from torch import nn
from torch.nn import functional

from compression import int8_matmul, lbi_codec
from compression.int8_matmul import (
    activation_offset,
    dequantize_output,
    int8_mode,
    int_conv2d,
    int_linear,
)
from compression.int8_matmul import (
    int8_matmul as int8_mm,
)
from compression.lowbit import INT4, INT8, BitWidths, convert_to_lowbit, set_bit_widths
from compression.primitives import fake_quantize, grid
from fl_app.client_app import client_fn
from tests.helpers import build_test_strategy, manager_with
from tools.inprocess import make_contexts

EPS32 = 2.0**-24
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (activation bits, signed): unsigned 8-bit takes the zero-point route, the rest fit int8.
ACTIVATIONS = [(8, False), (8, True), (4, False), (6, True)]


def codes(shape, bits: int, signed: bool, gen: torch.Generator) -> torch.Tensor:
    """Integer codes (float) filling the grid, both ends included."""
    low, high = grid(bits, signed)
    out = torch.randint(low, high + 1, shape, generator=gen).to(torch.float32)
    flat = out.view(-1)
    flat[0], flat[-1] = low, high
    return out


def pow2_channel_scales(n: int, gen: torch.Generator) -> torch.Tensor:
    return 2.0 ** -torch.randint(3, 8, (n,), generator=gen).to(torch.float32)


# ------------------------------------------------------------------------------ the GEMM
@pytest.mark.parametrize(("m", "k", "n"), [(1, 1, 1), (5, 12, 3), (17, 16, 8), (40, 75, 19)])
def test_reference_int8_matmul_is_exact(m, k, n):
    gen = torch.Generator().manual_seed(m * k * n)
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    a[0, 0], w[0, 0] = -128, -128
    got = int8_mm(a, w, backend="reference")
    assert got.dtype == torch.int32
    want = a.numpy().astype(np.int64) @ w.numpy().astype(np.int64).T
    np.testing.assert_array_equal(got.numpy(), want)


def test_int8_matmul_checks_its_operands():
    a = torch.zeros(4, 3, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8"):
        int8_mm(a.float(), a)
    with pytest.raises(ValueError, match="do not multiply"):
        int8_mm(a, torch.zeros(4, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="backend"):
        int8_mm(a, a, backend="tpu")
    assert torch.equal(int8_mm(a, a), torch.zeros(4, 4, dtype=torch.int32))  # CPU: reference


def test_unsigned_8_bit_activations_take_a_zero_point():
    assert activation_offset(8, signed=False) == 128
    assert activation_offset(8, signed=True) == activation_offset(4, signed=False) == 0
    with pytest.raises(ValueError):
        activation_offset(16, signed=True)


# ------------------------------------------------------------------------------ Linear
@pytest.mark.parametrize(("a_bits", "signed"), ACTIVATIONS)
@pytest.mark.parametrize("w_bits", [8, 4])
def test_linear_integer_path_equals_fake_quant_on_grids(a_bits, signed, w_bits):
    gen = torch.Generator().manual_seed(a_bits * 10 + w_bits)
    m, k, n = 37, 48, 11
    s_a = torch.tensor(2.0**-5)
    s_w = pow2_channel_scales(n, gen).reshape(n, 1)
    x_codes = codes((m, k), a_bits, signed, gen)
    w_codes = codes((n, k), w_bits, True, gen)
    bias = torch.randint(-500, 500, (n,), generator=gen) * (s_a * s_w.reshape(-1))
    x_fq = fake_quantize(x_codes * s_a, s_a, a_bits, signed)
    w_fq = fake_quantize(w_codes * s_w, s_w, w_bits, True)
    assert torch.equal(x_fq, x_codes * s_a)  # already on the grid
    fake = functional.linear(x_fq, w_fq, bias)

    acc = int_linear(x_codes, w_codes, activation_offset(a_bits, signed))
    want_acc = x_codes.double() @ w_codes.double().T
    assert acc.dtype == torch.int32 and torch.equal(acc.double(), want_acc)
    got = dequantize_output(acc, s_a, s_w, bias, channel_dim=1)
    assert torch.equal(got, fake)


def test_linear_integer_path_is_within_float32_rounding_for_any_scale():
    gen = torch.Generator().manual_seed(1)
    m, k, n = 33, 120, 10
    s_a = torch.rand((), generator=gen) * 0.1 + 0.01
    s_w = torch.rand((n, 1), generator=gen) * 0.05 + 0.001
    x_codes, w_codes = codes((m, k), 8, False, gen), codes((n, k), 8, True, gen)
    bias = torch.randn(n, generator=gen)
    x_fq = fake_quantize(x_codes * s_a, s_a, 8, False)
    w_fq = fake_quantize(w_codes * s_w, s_w, 8, True)
    fake = functional.linear(x_fq, w_fq, bias)
    got = dequantize_output(int_linear(x_codes, w_codes, 128), s_a, s_w, bias, channel_dim=1)
    terms = functional.linear(x_fq.double().abs(), w_fq.double().abs()) + bias.double().abs()
    bound = (k + 8) * EPS32 * terms
    assert torch.all((got.double() - fake.double()).abs() <= bound)


# ------------------------------------------------------------------------------ Conv2d
CONVS = [
    # (kernel, stride, padding, dilation)
    ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 3), (2, 2), (1, 1), (1, 1)),
    ((1, 1), (1, 1), (0, 0), (1, 1)),
    ((3, 2), (2, 1), (2, 0), (1, 1)),
    ((3, 3), (1, 1), (2, 2), (2, 2)),
]


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), CONVS)
@pytest.mark.parametrize(("a_bits", "signed"), ACTIVATIONS)
def test_conv_integer_path_equals_fake_quant_on_grids(
    kernel, stride, padding, dilation, a_bits, signed
):
    gen = torch.Generator().manual_seed(sum(kernel) + sum(stride) * 7 + a_bits)
    batch, c, o, h, w = 2, 5, 9, 9, 8
    s_a = torch.tensor(2.0**-6)
    s_w = pow2_channel_scales(o, gen).reshape(o, 1, 1, 1)
    x_codes = codes((batch, c, h, w), a_bits, signed, gen)
    w_codes = codes((o, c, *kernel), 8, True, gen)
    bias = torch.randint(-300, 300, (o,), generator=gen) * (s_a * s_w.reshape(-1))
    x_fq = fake_quantize(x_codes * s_a, s_a, a_bits, signed)
    w_fq = fake_quantize(w_codes * s_w, s_w, 8, True)
    fake = functional.conv2d(x_fq, w_fq, bias, stride, padding, dilation)

    offset = activation_offset(a_bits, signed)
    acc = int_conv2d(x_codes, w_codes, stride, padding, dilation, offset)
    want_acc = functional.conv2d(
        x_codes.double(), w_codes.double(), None, stride, padding, dilation
    )
    assert acc.dtype == torch.int32 and acc.shape == fake.shape
    assert torch.equal(acc.double(), want_acc)
    got = dequantize_output(acc, s_a, s_w, bias, channel_dim=1)
    assert torch.equal(got, fake)


# ------------------------------------------------------------------------------ the layers
def lowbit_pair(module: nn.Module, widths: BitWidths) -> nn.Module:
    model = nn.Sequential(module, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(2, *INPUT[type(module)]))  # materialise the lazy layer
    convert_to_lowbit(model, "conv-linear", refresh_interval=1)
    set_bit_widths(model, widths)
    return model


INPUT = {nn.Conv2d: (3, 6, 6), nn.Linear: (12,)}


def train_step(model: nn.Module, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, list]:
    """Forward and backward; the upstream gradient is fixed (not a function of the output), so
    both paths quantize the very same output gradients."""
    with int8_mode(mode):
        torch.manual_seed(0)  # the stochastic gradient rounding draws the same noise
        x = x.clone().requires_grad_(True)
        y = model(x)
        upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        (y * upstream.to(y.device)).sum().backward()
    grads = [x.grad.clone(), *(p.grad.clone() for p in model.parameters())]
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("first", [nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Linear(12, 8)])
@pytest.mark.parametrize("widths", [INT8, INT4, BitWidths(8, 6, 8)])
def test_layers_run_integer_products_with_the_fake_quant_gradients(first, widths, monkeypatch):
    """The layer hook on CPU (reference GEMM, mode ``always``): same forward up to float32
    rounding, and the backward is the fake-quant path's (the same products of the same
    tensors), both the first layer (signed input) and the one behind the ReLU (unsigned)."""
    calls = []
    real = int8_matmul.int8_matmul

    def counting(a, w, backend="auto"):
        calls.append(backend)
        return real(a, w, backend)

    monkeypatch.setattr(int8_matmul, "int8_matmul", counting)
    torch.manual_seed(3)
    model = lowbit_pair(first, widths)
    x = torch.randn(4, *INPUT[type(first)])
    y_fake, g_fake = train_step(model, x, "never")
    assert not calls
    y_int, g_int = train_step(model, x, "always")
    assert len(calls) == 2  # both layers took the integer path
    torch.testing.assert_close(y_int, y_fake, rtol=1e-5, atol=1e-6)
    for got, want in zip(g_int, g_fake, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_auto_mode_keeps_the_cpu_on_fake_quantization(monkeypatch):
    calls = []
    monkeypatch.setattr(int8_matmul, "int8_matmul", lambda *a, **k: calls.append(1))
    model = lowbit_pair(nn.Linear(12, 8), INT8)
    assert int8_matmul.get_int8_mode() == "auto"
    model(torch.randn(4, 12))
    assert not calls


def test_wider_than_8_bits_or_grouped_convs_stay_on_fake_quantization(monkeypatch):
    calls = []
    monkeypatch.setattr(int8_matmul, "int8_matmul", lambda *a, **k: calls.append(1))
    with int8_mode("always"):
        lowbit_pair(nn.Linear(12, 8), BitWidths(16, 8, 8))(torch.randn(4, 12))
        lowbit_pair(nn.Linear(12, 8), BitWidths(8, 32, 8))(torch.randn(4, 12))
        grouped = convert_to_lowbit(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))
        set_bit_widths(grouped, INT8)
        grouped(torch.randn(2, 4, 5, 5))
    assert not calls
    with pytest.raises(ValueError):
        int8_matmul.set_int8_mode("sometimes")


@pytest.mark.parametrize("mode", ["ui8", "ui4"])
def test_an_lbi_client_round_through_integer_products_matches_fake_quant(
    tmp_path, mode, monkeypatch
):
    """A whole LBI-FL client round (digits CNN with BatchNorm, every conv and linear) with the
    integer path forced on the CPU by ``lbi-int8-kernels=always``: same training up to float32
    rounding; with ``never`` no integer product runs, whatever the process-wide mode."""
    calls: list[str] = []
    real = int8_matmul.int8_matmul

    def counting(a, w, backend="auto"):
        calls.append(a.device.type)
        return real(a, w, backend)

    monkeypatch.setattr(int8_matmul, "int8_matmul", counting)
    base = {
        "strategy": "lbi-fl",
        "device": "cpu",
        "lbi-mode": mode,
        "local-epochs": 1,
        "batch-size": 64,
        "partitioner": "iid",
        "min-available-clients": 1,
        "entropy": "none",  # the plain codec below reads the uploads
    }
    strategy = build_test_strategy(base, tmp_path)
    ((_, ins),) = strategy.configure_fit(1, Parameters([], ""), manager_with(1))
    replies = {}
    products = {}
    for int_mode in ("never", "always"):
        context = make_contexts(
            {**base, "lbi-int8-kernels": int_mode, "results-dir": str(tmp_path)}, 4
        )[0]
        calls.clear()
        with int8_mode("always" if int_mode == "never" else "never"):  # the key wins
            replies[int_mode] = client_fn(context).fit(ins)
        products[int_mode] = len(calls)
    assert products["never"] == 0 and products["always"] > 0
    fake, integer = replies["never"], replies["always"]
    assert integer.num_examples == fake.num_examples
    # Close, not bit for bit: a last-bit difference of one layer's output (the one float32
    # rounding the paths place differently) shifts the batch statistics of the BatchNorm
    # behind it, hence the next layer's max-abs activation scale by an ulp, which moves the
    # codes that sat on a rounding tie; SGD carries that on. Any float reordering does the same
    # (measured: loss 5e-4 apart after 6 steps, weights 3-4% apart in L2 after the 4/8-bit
    # upload's rounding).
    assert integer.metrics["train-loss"] == pytest.approx(fake.metrics["train-loss"], rel=1e-2)
    codec = lbi_codec.LBIWeightCodec(strategy.split)

    def weights(reply) -> np.ndarray:
        message = codec.decode(parameters_to_ndarrays(reply.parameters))
        return np.concatenate([w.ravel() for w in lbi_codec.dequantize(message, strategy.split)])

    w_fake, w_int = weights(fake), weights(integer)
    assert np.linalg.norm(w_int - w_fake) < 0.1 * np.linalg.norm(w_fake)


# ------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(("m", "k", "n"), [(1, 1, 1), (16, 8, 8), (17, 16, 8), (300, 75, 19)])
def test_cuda_kernel_equals_the_exact_reference(m, k, n):
    assert int8_matmul.cuda_kernel_available(torch.device("cuda"))
    gen = torch.Generator().manual_seed(m + k + n)
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    got = int8_mm(a.cuda(), w.cuda(), backend="cuda").cpu()
    assert torch.equal(got, int8_mm(a, w, backend="reference"))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), CONVS)
def test_cuda_conv_accumulation_is_exact(kernel, stride, padding, dilation):
    gen = torch.Generator().manual_seed(11)
    x_codes = codes((3, 16, 10, 10), 8, False, gen)
    w_codes = codes((24, 16, *kernel), 8, True, gen)
    got = int_conv2d(x_codes.cuda(), w_codes.cuda(), stride, padding, dilation, 128).cpu()
    want = int_conv2d(x_codes, w_codes, stride, padding, dilation, 128)
    assert torch.equal(got, want)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(
    "make_layer", [lambda: nn.Conv2d(16, 24, 3, padding=1), lambda: nn.Linear(40, 24)]
)
@pytest.mark.parametrize("widths", [INT8, INT4])
def test_cuda_layers_pick_the_integer_kernel(make_layer, widths, monkeypatch):
    """Auto mode on CUDA: the kernel runs; the forward equals the CPU's float32 fake quant up
    to float32 rounding (one layer, so both see the same codes), and the gradients equal the
    CUDA fake-quant path's."""
    calls = []
    real = int8_matmul.int8_matmul

    def counting(a, w, backend="auto"):
        calls.append(a.device.type)
        return real(a, w, backend)

    monkeypatch.setattr(int8_matmul, "int8_matmul", counting)
    torch.manual_seed(3)
    layer = make_layer()  # a fresh module per case: model.cuda() below moves it in place
    model = convert_to_lowbit(nn.Sequential(layer), refresh_interval=1)
    set_bit_widths(model, widths)
    shape = (32, 16, 6, 6) if isinstance(layer, nn.Conv2d) else (32, 40)
    x = torch.randn(shape).relu()  # unsigned activations: the zero-point route at 8 bits
    with torch.no_grad(), int8_mode("never"):
        want = model.eval()(x)
    model = model.cuda()
    with torch.no_grad():
        got = model(x.cuda()).cpu()
    assert calls == ["cuda"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    model.train()
    y_int, g_int = train_step(model, x.cuda(), "auto")
    y_fake, g_fake = train_step(model, x.cuda(), "never")
    assert calls == ["cuda", "cuda"]
    for got_grad, want_grad in zip(g_int, g_fake, strict=True):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-5)
