"""Attention's matrix products, which ``compression.lowbit.layer_macs`` does not count.

LBI-FL's BitOPs (``compression.lowbit``) count the MACs of Conv2d/Linear layers, as the paper's
Table 2 does; a transformer's Q K^T and attention-weights x V products are no layer. This module
counts them apart, so the share left out of the Table 2 comparison can be stated. It lives
outside ``lowbit.py`` because a shipped LBI-FL agent records that file's hash: counting code
must not make a trained agent's provenance stale.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def attention_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Forward MACs per sample of attention's two matrix products (Q K^T and the weights times
    V), which ``layer_macs`` does not see: they are no layer, and they run in full precision.
    Counted during a one-sample forward pass: for every ``nn.MultiheadAttention`` (torchvision's
    ViT; its fused fast path calls nothing that could be wrapped) 2 x T x S x E from its input
    shapes, and for every other call of ``scaled_dot_product_attention`` (the project's ViTs)
    2 x heads x T x S x d."""
    functional = nn.functional
    original = functional.scaled_dot_product_attention
    total = 0
    inside = 0  # depth of MultiheadAttention forwards, which count themselves

    def counting(query: torch.Tensor, key: torch.Tensor, *args: object, **kwargs: object):
        nonlocal total
        if not inside:
            *batch, tokens, depth = query.shape
            total += 2 * math.prod(batch) * tokens * key.shape[-2] * depth
        return original(query, key, *args, **kwargs)

    def enter(module: nn.MultiheadAttention, inputs: tuple[torch.Tensor, ...]) -> None:
        nonlocal inside, total
        inside += 1
        query, key = inputs[0], inputs[1]
        token_dim = 1 if module.batch_first else 0
        total += 2 * query.shape[token_dim] * key.shape[token_dim] * module.embed_dim

    def leave(*_: object) -> None:
        nonlocal inside
        inside -= 1

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            hooks.append(module.register_forward_pre_hook(enter))
            hooks.append(module.register_forward_hook(leave))
    was_training = model.training
    device = next(model.parameters()).device
    functional.scaled_dot_product_attention = counting
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        functional.scaled_dot_product_attention = original
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    return total
