"""PyTorch helpers shared by clients (local training) and strategies (central evaluation).

The *wire state* of a model is the list of its floating-point ``state_dict`` entries in
``state_dict`` order: parameters plus BatchNorm running statistics. Integer buffers
(``num_batches_tracked``) stay local: they only matter for BatchNorm with ``momentum=None``,
which no model here uses, and sending them would add an int64 array per BN layer to every message.
The number of scalars in the wire state is the denominator of every bpp figure.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from compression.layout import SplitLayout


def select_device(preference: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU fails instead of falling back."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but torch.cuda.is_available() is False")
    if preference not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of 'auto', 'cpu', 'cuda', got {preference!r}")
    return torch.device(preference)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several integers (run seed, client id, round)."""
    state = np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def wire_keys(model: nn.Module) -> list[str]:
    """Names of the ``state_dict`` entries that travel: every floating-point tensor."""
    return [k for k, v in model.state_dict().items() if torch.is_floating_point(v)]


def get_wire_state(model: nn.Module) -> list[np.ndarray]:
    """The model's wire state as float32 NumPy arrays (copies, safe to keep)."""
    state = model.state_dict()
    return [state[k].detach().to("cpu", torch.float32).numpy().copy() for k in wire_keys(model)]


def set_wire_state(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Load a wire state produced by ``get_wire_state`` of the same architecture."""
    keys = wire_keys(model)
    if len(keys) != len(arrays):
        raise ValueError(f"expected {len(keys)} arrays for this model, got {len(arrays)}")
    state = model.state_dict()
    with torch.no_grad():
        for key, array in zip(keys, arrays, strict=True):
            target = state[key]
            if tuple(target.shape) != tuple(array.shape):
                raise ValueError(f"{key}: expected shape {tuple(target.shape)}, got {array.shape}")
            target.copy_(torch.as_tensor(array, dtype=target.dtype))


def count_wire_scalars(model: nn.Module) -> int:
    """Scalars in a plain FedAvg message of ``model``: the bpp denominator."""
    state = model.state_dict()
    return sum(state[k].numel() for k in wire_keys(model))


def iterate_minibatches(
    data: TensorDataset, batch_size: int, generator: torch.Generator, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled mini-batches of an in-memory dataset (no DataLoader workers: data is small and
    already tensors, so indexing is faster than per-sample collation)."""
    images, labels = data.tensors
    order = torch.randperm(len(labels), generator=generator)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield images[idx].to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)


@torch.no_grad()
def evaluate_model(
    model: nn.Module, data: TensorDataset, device: torch.device, batch_size: int = 512
) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``data``."""
    model.to(device).eval()
    images, labels = data.tensors
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        logits = model(x)
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
    count = max(len(labels), 1)
    return total_loss / count, correct / count


def conv_linear_weight_keys(model: nn.Module) -> list[str]:
    """``state_dict`` keys of Conv2d and Linear weights: the tensors quantization methods encode.
    Biases and BatchNorm tensors stay in floating point (``wire_keys`` minus these)."""
    keys = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d | nn.Linear)
    }
    return [key for key in wire_keys(model) if key in keys]


def split_wire_state(
    model: nn.Module, selected: Iterable[str]
) -> tuple[list[int], list[int], SplitLayout]:
    """Wire-state indices of the ``selected`` tensors and of the rest, with their shapes.

    Codecs treat the two groups differently (e.g. quantized weights vs float extras).
    """
    keys = wire_keys(model)
    chosen = set(selected)
    state = model.state_dict()
    first = [i for i, key in enumerate(keys) if key in chosen]
    rest = [i for i, key in enumerate(keys) if key not in chosen]
    layout = SplitLayout(
        quantized_shapes=tuple(tuple(state[keys[i]].shape) for i in first),
        extra_shapes=tuple(tuple(state[keys[i]].shape) for i in rest),
    )
    return first, rest, layout


def quantized_split(model: nn.Module) -> tuple[list[int], list[int], SplitLayout]:
    """Conv2d/Linear weights (quantized or binarized by the methods) vs every other tensor."""
    return split_wire_state(model, conv_linear_weight_keys(model))


def parameter_split(model: nn.Module) -> tuple[list[int], list[int], SplitLayout]:
    """Trainable parameters vs buffers (BatchNorm running statistics)."""
    return split_wire_state(model, (name for name, _ in model.named_parameters()))
