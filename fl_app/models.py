"""Model zoo for the federated experiments, looked up by name from ``--run-config``.

Every model is built by a factory taking ``(in_channels, num_classes, image_size)`` so one
registry serves every dataset: the server and all clients call :func:`build_model` with the
same arguments and therefore get identical architectures whose weights can be averaged.
Factories never reseed, so ``torch.manual_seed`` before the call fixes the initial weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v2
from torchvision.models import resnet18 as tv_resnet18
from torchvision.models import resnet50 as tv_resnet50
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vision_transformer import VisionTransformer

from core.registry import Registry

ModelFactory = Callable[[int, int, int], nn.Module]
"""``(in_channels, num_classes, image_size) -> model``."""

MODELS: Registry[ModelFactory] = Registry("model")


def build_model(name: str, *, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Build model ``name`` for inputs of shape ``(in_channels, image_size, image_size)``.

    Raises ``UnknownNameError`` (a ``ValueError``) listing the valid names for an unknown model,
    and ``ValueError`` when the model cannot take the requested input, so a bad run config
    fails at start-up rather than deep inside the first training round.
    """
    factory = MODELS.get(name)
    for arg, value in (
        ("in_channels", in_channels),
        ("num_classes", num_classes),
        ("image_size", image_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"model {name!r}: {arg} must be a positive integer, got {value!r}")
    return factory(in_channels, num_classes, image_size)


def _require_min_size(name: str, image_size: int, minimum: int, why: str) -> None:
    """Fail with an explanation instead of a shape error from inside ``forward``."""
    if image_size < minimum:
        raise ValueError(f"model {name!r} needs image_size >= {minimum} ({why}), got {image_size}")


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """3x3 same-size conv; no bias because the following BatchNorm has its own shift."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


@MODELS.register("digits-cnn")
def digits_cnn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Small plain CNN (~52k params with 10 classes) for the 8x8 scikit-learn digits.

    No BatchNorm on purpose: it keeps the state_dict to weights and biases only, which makes
    this the simplest model for checking aggregation and compression code.
    """
    _require_min_size("digits-cnn", image_size, 8, "it is designed for 8x8 digits")
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        # Identity for 8x8 inputs; for larger ones it keeps the classifier at 64x4x4 inputs.
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 32),
        nn.ReLU(inplace=True),
        nn.Linear(32, num_classes),
    )


@MODELS.register("digits-cnn-bn")
def digits_cnn_bn(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """``digits-cnn`` with BatchNorm after each convolution (conv layers then carry no bias).

    The setting FedBiF was first measured on here: BatchNorm makes each layer's
    output invariant to the scale of its quantized weights, which helps low-bit training.
    """
    _require_min_size("digits-cnn-bn", image_size, 8, "it is designed for 8x8 digits")
    return nn.Sequential(
        *_conv_bn_relu(in_channels, 32),
        *_conv_bn_relu(32, 64),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 32),
        nn.ReLU(inplace=True),
        nn.Linear(32, num_classes),
    )


@MODELS.register("cnn4")
def cnn4(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Four conv-BN-ReLU-maxpool blocks (32/64/128/256 channels), as the FedBAT paper's CNN.

    Global average pooling before the linear layer makes the classifier independent of the
    image size (28x28 ends at 1x1, 32x32 at 2x2), so one definition serves all datasets.
    """
    _require_min_size("cnn4", image_size, 16, "four 2x2 max-pools")
    layers: list[nn.Module] = []
    channels = in_channels
    for width in (32, 64, 128, 256):
        layers += [*_conv_bn_relu(channels, width), nn.MaxPool2d(2)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


@MODELS.register("cnn4-fedbat")
def cnn4_fedbat(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The FedBAT authors' CNN4 (their ``CNN4``/``CNN4_MNIST``): four 3x3 conv-BN-ReLU-maxpool
    blocks of 32/64/128/256 channels without biases, the last map flattened into a linear
    classifier without bias (256 inputs for 28x28 images, 1,024 for 32x32), conv and linear
    weights drawn from N(0, 0.01) as in their ``weight_init``; BatchNorm keeps PyTorch's init.

    ``cnn4`` differs in its classifier (global average pooling, a bias) and PyTorch's default
    initialisation.
    """
    _require_min_size("cnn4-fedbat", image_size, 16, "four 2x2 max-pools")
    layers: list[nn.Module] = []
    channels = in_channels
    for width in (32, 64, 128, 256):
        layers += [*_conv_bn_relu(channels, width), nn.MaxPool2d(2)]
        channels = width
    side = image_size // 16
    layers += [nn.Flatten(), nn.Linear(channels * side * side, num_classes, bias=False)]
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.01)
    return model


@MODELS.register("mnist-cnn-cuq")
def mnist_cnn_cuq(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The clipped-quantization authors' MNIST network (their ``QuantizedNet``): two 3x3 conv
    layers of 16 channels without bias, each with BatchNorm, tanh and a 2x2 max-pool, then
    linear 784 -> 100 with BatchNorm and tanh, and linear 100 -> classes with BatchNorm. Its
    four weight tensors are the ones their per-layer widths {4, 2, 2, 4} refer to. (Their
    final log-softmax is left to the cross-entropy loss.)"""
    _require_min_size("mnist-cnn-cuq", image_size, 4, "two 2x2 max-pools")
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.Tanh(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * side * side, 100),
        nn.BatchNorm1d(100),
        nn.Tanh(),
        nn.Linear(100, num_classes),
        nn.BatchNorm1d(num_classes),
    )


# VGG-11 ("A") layout with every width halved (64 -> 32, ..., 512 -> 256): ~2.4M params instead
# of ~9M, which is the "VGG11 light" scale used by FedBiF on SVHN. "M" is a 2x2 max-pool.
_VGG11_LIGHT = (32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256, "M")


@MODELS.register("vgg11-light")
def vgg11_light(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """VGG-11 with halved widths, BatchNorm, and a 256-256-classes head for 32x32 images."""
    _require_min_size("vgg11-light", image_size, 32, "five 2x2 max-pools")
    layers: list[nn.Module] = []
    channels = in_channels
    for item in _VGG11_LIGHT:
        if isinstance(item, int):
            layers += _conv_bn_relu(channels, item)
            channels = item
        else:
            layers.append(nn.MaxPool2d(2))
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 256),
        nn.ReLU(inplace=True),
        nn.Linear(256, num_classes),
    ]
    return nn.Sequential(*layers)


def _cifar_resnet(
    layers: list[int],
    in_channels: int,
    num_classes: int,
    block: type[BasicBlock] | type[Bottleneck] = BasicBlock,
) -> nn.Module:
    """torchvision's ResNet with the small-image stem used for CIFAR-sized inputs.

    The ImageNet stem (7x7 stride-2 conv + max-pool) would shrink a 32x32 image to 8x8 before
    the first block; a 3x3 stride-1 conv without the pool keeps the resolution, as is usual
    for CIFAR ResNets. The global average pool makes any input size work.
    """
    model = ResNet(block, layers, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    # Match the Kaiming init torchvision gave the stem it replaced.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


@MODELS.register("resnet10")
def resnet10(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """CIFAR-style ResNet-10: one BasicBlock per stage."""
    return _cifar_resnet([1, 1, 1, 1], in_channels, num_classes)


@MODELS.register("resnet18")
def resnet18(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """CIFAR-style ResNet-18 (~11.17M params with 10 classes)."""
    return _cifar_resnet([2, 2, 2, 2], in_channels, num_classes)


@MODELS.register("resnet34")
def resnet34(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """CIFAR-style ResNet-34."""
    return _cifar_resnet([3, 4, 6, 3], in_channels, num_classes)


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling; the first conv pads by 2 so 28x28 works unchanged.

    The flattened size is computed from ``image_size``, so 28x28 gives the classic 16x5x5
    features and 32x32 gives 16x6x6.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        # conv1 keeps the size, pool halves it, conv2 (5x5, no pad) loses 4, pool halves it.
        side = (image_size // 2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * side * side, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@MODELS.register("lenet5")
def lenet5(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Classic LeNet-5 for 28x28 and 32x32 images."""
    # The second pool needs at least a 2x2 map: image_size // 2 - 4 >= 2.
    _require_min_size("lenet5", image_size, 12, "two 5x5 convs and two 2x2 max-pools")
    return LeNet5(in_channels, num_classes, image_size)


@MODELS.register("resnet50")
def resnet50(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """torchvision's Bottleneck ResNet-50 with the CIFAR stem (LBI-FL's larger model)."""
    return _cifar_resnet([3, 4, 6, 3], in_channels, num_classes, block=Bottleneck)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): three stages of n BasicBlocks at 16/32/64 channels.

    Depth 6n + 2 (n = 3: ResNet-20). Projection (1x1 conv) shortcuts where the shape changes
    instead of the paper's zero-padding, so torchvision's BasicBlock is reused unchanged.
    """

    def __init__(self, blocks_per_stage: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        inplanes = 16
        for stage, width in enumerate((16, 32, 64)):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                shortcut = None
                if stride != 1 or inplanes != width:
                    shortcut = nn.Sequential(
                        nn.Conv2d(inplanes, width, kernel_size=1, stride=stride, bias=False),
                        nn.BatchNorm2d(width),
                    )
                blocks.append(BasicBlock(inplanes, width, stride, shortcut))
                inplanes = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


@MODELS.register("resnet20")
def resnet20(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """CIFAR ResNet-20 (~0.27M parameters), the clipped-UQ and LBI-FL papers' small ResNet."""
    return CifarResNet(3, in_channels, num_classes)


@MODELS.register("mobilenetv2")
def mobilenetv2(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """torchvision's MobileNetV2 with a stride-1 stem, the usual adaptation to 32x32 inputs
    (the ImageNet stem's stride 2 would leave 1x1 maps before the last stage)."""
    model = mobilenet_v2(num_classes=num_classes)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(
        in_channels,
        stem.out_channels,
        kernel_size=3,
        stride=1 if image_size <= 64 else 2,
        padding=1,
        bias=False,
    )
    nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model


@MODELS.register("vit-s")
def vit_small(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """ViT-S (12 layers, 6 heads, width 384, MLP 1536) on torchvision's VisionTransformer,
    with 4x4 patches for images up to 32 pixels and 8x8 above (64 patches either way)."""
    patch = 4 if image_size <= 32 else 8
    if image_size % patch:
        raise ValueError(
            f"model 'vit-s': image_size {image_size} is not a multiple of the {patch}-pixel patch"
        )
    model = VisionTransformer(
        image_size=image_size,
        patch_size=patch,
        num_layers=12,
        num_heads=6,
        hidden_dim=384,
        mlp_dim=1536,
        num_classes=num_classes,
    )
    if in_channels != 3:
        model.conv_proj = nn.Conv2d(in_channels, 384, kernel_size=patch, stride=patch)
    return model


# --------------------------------------------------------------------------- LBI-FL's Table 2
# The variants whose forward MACs on 32x32 CIFAR input match the LBI-FL paper's BitOPs (Table 2:
# BitOPs at FP32 = MACs x 32 x 32 x 3): ``benchmarks/README.md`` lists both counts.


@MODELS.register("lenet-cifar")
def lenet_cifar(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The CIFAR "LeNet" of FL papers: 5x5 convs of 64 channels (no padding), 2x2 max-pools,
    then 384-192-classes; 14.69 M MACs at 32x32 (the LBI-FL paper counts 14.81 M)."""
    _require_min_size("lenet-cifar", image_size, 16, "two 5x5 convs and two 2x2 max-pools")
    side = ((image_size - 4) // 2 - 4) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, kernel_size=5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, kernel_size=5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, 384),
        nn.ReLU(inplace=True),
        nn.Linear(384, 192),
        nn.ReLU(inplace=True),
        nn.Linear(192, num_classes),
    )


def _imagenet_stem(model: nn.Module, in_channels: int) -> nn.Module:
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@MODELS.register("resnet18-imagenet")
def resnet18_imagenet(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """torchvision's ResNet-18 with its ImageNet stem (7x7 stride-2 conv, max-pool), as the
    LBI-FL paper counts it on CIFAR: 37.0 M MACs at 32x32 (``resnet18``, with the CIFAR stem,
    has 555 M)."""
    return _imagenet_stem(tv_resnet18(num_classes=num_classes), in_channels)


@MODELS.register("resnet50-imagenet")
def resnet50_imagenet(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """torchvision's ResNet-50 with its ImageNet stem (83.4 M MACs at 32x32; the LBI-FL paper
    counts 84.1 M)."""
    return _imagenet_stem(tv_resnet50(num_classes=num_classes), in_channels)


@MODELS.register("mobilenetv2-cifar")
def mobilenetv2_cifar(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """MobileNetV2 as CIFAR code bases adapt it: stride-1 stem and a stride-1 second stage
    (the first stride-2 block), so 32x32 inputs keep 32x32 maps through the early blocks:
    88.0 M MACs at 32x32, 7% below the LBI-FL paper's 94.6 M (its variant is not stated)."""
    model = mobilenetv2(in_channels, num_classes, image_size)
    first_stride_two = model.features[2].conv[1][0]  # the depthwise conv of stage 2's block 1
    first_stride_two.stride = (1, 1)
    return model


class _Attention(nn.Module):
    """Multi-head self-attention with ``nn.Linear`` projections (so low-bit conversion and the
    BitOPs count see them, unlike ``nn.MultiheadAttention``'s fused parameter)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CifarViT(nn.Module):
    """A ViT for small images: patch embedding (a strided conv), class token, learned position
    embedding, pre-norm blocks, a linear head on the class token."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        patch: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
    ) -> None:
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.embed = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(_Block(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        return self.head(self.norm(self.blocks(x))[:, 0])


@MODELS.register("vit-cifar")
def vit_cifar(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The CIFAR ViT of common code bases (4x4 patches, width 512, 6 blocks, 8 heads, MLP 512):
    615 M MACs in its linear layers at 32x32, the LBI-FL paper's "ViT-S" count (622 M)."""
    if image_size % 4:
        raise ValueError(f"model 'vit-cifar': image_size {image_size} is not a multiple of 4")
    return CifarViT(in_channels, num_classes, image_size, 4, 512, 6, 8, 512)
