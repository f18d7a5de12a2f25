"""PyTorch helpers shared by clients (local training) and strategies (central evaluation)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import TensorDataset


def select_device(preference: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU fails instead of falling back."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but torch.cuda.is_available() is False")
    if preference not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of 'auto', 'cpu', 'cuda', got {preference!r}")
    return torch.device(preference)


def apply_thread_count(threads: int) -> int:
    """Pin torch's intra-op CPU threads when ``threads`` > 0; returns the count now in force.

    CPU kernels split their reductions by thread, so a seed reproduces a run bit for bit only at
    the same count: pinning it makes a run independent of ``OMP_NUM_THREADS`` and the core count.
    """
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = torch's default), got {threads}")
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


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
