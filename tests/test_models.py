"""Tests for the model registry: every (model, dataset shape) pair the experiments use must build
and run, and builds must be reproducible so server and clients start from the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fl_app.models import MODELS, build_model

EXPECTED_NAMES = {
    "digits-cnn",
    "digits-cnn-bn",
    "cnn4",
    "cnn4-fedbat",
    "mnist-cnn-cuq",
    "lenet-cifar",
    "resnet18-imagenet",
    "resnet50-imagenet",
    "mobilenetv2-cifar",
    "vit-cifar",
    "vgg11-light",
    "resnet10",
    "resnet18",
    "resnet34",
    "lenet5",
    "resnet20",
    "resnet50",
    "mobilenetv2",
    "vit-s",
}

# (model, in_channels, image_size, num_classes) combinations used by the experiments.
SUPPORTED = [
    ("resnet20", 3, 32, 10),
    ("resnet20", 3, 32, 100),
    ("resnet50", 3, 32, 100),
    ("resnet50", 3, 64, 200),
    ("mobilenetv2", 3, 32, 10),
    ("mobilenetv2", 1, 28, 10),
    ("vit-s", 3, 32, 10),
    ("vit-s", 3, 64, 200),
    ("vit-s", 1, 28, 10),
    ("digits-cnn", 1, 8, 10),
    ("digits-cnn-bn", 1, 8, 10),
    ("cnn4", 1, 28, 10),
    ("cnn4", 3, 32, 10),
    ("cnn4", 3, 32, 100),
    ("cnn4-fedbat", 1, 28, 10),
    ("cnn4-fedbat", 3, 32, 10),
    ("mnist-cnn-cuq", 1, 28, 10),
    ("lenet-cifar", 3, 32, 10),
    ("resnet18-imagenet", 3, 32, 10),
    ("mobilenetv2-cifar", 3, 32, 10),
    ("vit-cifar", 3, 32, 10),
    ("vit-cifar", 1, 28, 10),
    ("vgg11-light", 3, 32, 10),
    ("resnet10", 3, 32, 10),
    ("resnet10", 1, 28, 10),
    ("resnet10", 3, 32, 100),
    ("resnet18", 3, 32, 10),
    ("resnet18", 1, 28, 10),
    ("resnet18", 3, 32, 100),
    ("resnet34", 3, 32, 10),
    ("resnet34", 1, 28, 10),
    ("resnet34", 3, 32, 100),
    ("lenet5", 1, 28, 10),
    ("lenet5", 3, 32, 10),
]


def _build(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    return build_model(
        name, in_channels=in_channels, num_classes=num_classes, image_size=image_size
    )


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "in_channels", "image_size", "num_classes"), SUPPORTED)
def test_forward_shape(name: str, in_channels: int, image_size: int, num_classes: int) -> None:
    torch.manual_seed(0)
    model = _build(name, in_channels, image_size, num_classes).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


def test_registered_names() -> None:
    assert set(MODELS.names()) == EXPECTED_NAMES


def test_digits_cnn_param_count() -> None:
    assert 20_000 <= _num_params(_build("digits-cnn", 1, 8, 10)) <= 80_000


def test_resnet18_param_count_matches_cifar_resnet18() -> None:
    assert 11_000_000 <= _num_params(_build("resnet18", 3, 32, 10)) <= 11_300_000


def test_resnet_depths_are_ordered() -> None:
    counts = [_num_params(_build(n, 3, 32, 10)) for n in ("resnet10", "resnet18", "resnet34")]
    assert counts[0] < counts[1] < counts[2]


@pytest.mark.parametrize(
    ("name", "in_channels", "image_size"), [("digits-cnn", 1, 8), ("cnn4", 3, 32)]
)
def test_backward_reaches_every_parameter(name: str, in_channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    model = _build(name, in_channels, image_size, 10).train()
    x = torch.randn(2, in_channels, image_size, image_size)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1]))
    loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name


def test_unknown_name_lists_valid_choices() -> None:
    with pytest.raises(ValueError) as excinfo:
        build_model("nope", in_channels=1, num_classes=10, image_size=8)
    message = str(excinfo.value)
    assert "digits-cnn" in message
    assert "resnet18" in message


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
def test_same_seed_gives_same_weights(name: str) -> None:
    torch.manual_seed(0)
    first = _build(name, 3, 32, 10).state_dict()
    torch.manual_seed(0)
    second = _build(name, 3, 32, 10).state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize(("name", "image_size"), [("vgg11-light", 8), ("cnn4", 8), ("lenet5", 8)])
def test_too_small_image_is_rejected(name: str, image_size: int) -> None:
    with pytest.raises(ValueError, match="image_size"):
        _build(name, 3, image_size, 10)


def test_non_positive_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model("cnn4", in_channels=3, num_classes=0, image_size=32)


def test_cnn4_fedbat_is_the_authors_architecture() -> None:
    """32/64/128/256 conv-BN-ReLU-pool, no conv or linear bias, flatten into a bias-free linear
    layer (256 inputs at 28x28, 1,024 at 32x32), N(0, 0.01) conv/linear weights."""
    torch.manual_seed(0)
    fmnist = _build("cnn4-fedbat", 1, 28, 10)
    convs = [m for m in fmnist.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in fmnist.modules() if isinstance(m, nn.Linear)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    assert all(c.bias is None for c in convs) and len(linears) == 1 and linears[0].bias is None
    assert linears[0].in_features == 256
    assert _build("cnn4-fedbat", 3, 32, 10)[-1].in_features == 1024
    big = torch.cat([c.weight.reshape(-1) for c in convs[1:]])
    assert abs(float(big.std()) - 0.01) < 0.0005 and abs(float(big.mean())) < 0.0005
    # weights + BN affine (2 x 480) and the classifier: the FedBAT CNN4 size for FMNIST
    assert _num_params(fmnist) == 9 * (32 + 32 * 64 + 64 * 128 + 128 * 256) + 2 * 480 + 2560


@pytest.mark.parametrize(
    ("name", "paper_bitops"),
    [
        ("lenet-cifar", 45.5e9),
        ("resnet18-imagenet", 114.2e9),
        ("resnet50-imagenet", 258.4e9),
        ("vit-cifar", 1910.5e9),
    ],
)
def test_lbi_table2_bitops_are_reproduced_within_two_percent(
    name: str, paper_bitops: float
) -> None:
    """The LBI-FL paper's FP32 BitOPs on CIFAR-10 (Table 2) = forward MACs x 32 x 32 x 3."""
    from compression.lowbit import FP32, convert_to_lowbit, layer_macs, training_bitops

    model = convert_to_lowbit(_build(name, 3, 32, 10), "conv-linear")
    macs = sum(layer_macs(model, (3, 32, 32)).values())
    assert training_bitops(macs, FP32) == pytest.approx(paper_bitops, rel=0.02)


@pytest.mark.parametrize(("name", "blocks", "width"), [("vit-cifar", 6, 512), ("vit-s", 12, 384)])
def test_attention_products_are_counted_apart(name, blocks, width):
    """Attention's Q K^T and weights x V are no layer, so the BitOPs count (linear layers, as
    the paper) leaves them out: 2 x T^2 x width per block with T = 64 patches + the class token
    at 32x32; for vit-cifar 26.0 M MACs, 4.2% beside its 615 M in linear layers."""
    from compression.attention_macs import attention_macs

    model = build_model(name, in_channels=3, num_classes=10, image_size=32)
    assert attention_macs(model, (3, 32, 32)) == blocks * 2 * 65 * 65 * width
