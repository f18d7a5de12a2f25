"""A model's *wire state*: the tensors that travel, and how methods split them.

The wire state is the list of the model's floating-point ``state_dict`` entries in
``state_dict`` order: parameters plus BatchNorm running statistics. Integer buffers
(``num_batches_tracked``) stay local: they only matter for BatchNorm with ``momentum=None``,
which no model here uses, and sending them would add an int64 array per BN layer to every message.
The number of scalars in the wire state is the denominator of every bpp figure.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from compression.layout import SplitLayout


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
