"""PyTorch helpers shared by clients (local training) and strategies (central evaluation)."""

from __future__ import annotations

import os
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


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a container's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def omp_thread_limit() -> int | None:
    """``OMP_NUM_THREADS`` when it holds a positive integer: a process started with it (several
    SuperNodes on one host, a job beside others) was told how many threads it may use."""
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value > 0 else None


def auto_thread_count(requested: int, given_cpus: float | None) -> int:
    """The thread count a process should run torch at: ``requested`` when > 0 (the run pins it),
    else the CPUs the run gives this process (``given_cpus``, at least 1), else 1.

    One thread is the default for a process the run gives no CPUs explicitly (the server, the
    in-process runner): it shares the cores with client workers and other jobs, and an OpenMP
    team larger than the cores it gets spins at every barrier. Measured on 2 cores (digits,
    10 clients, 10 rounds, in one process): 2 threads 6.0 s and 1 thread 6.7 s on a quiet
    machine, but 91 s against 11.4 s beside a 2-process CPU load (``benchmarks/threads_load.py``).
    """
    if requested < 0:
        raise ValueError(f"threads must be >= 0 (0 = auto), got {requested}")
    if requested:
        return requested
    if given_cpus is None or not given_cpus >= 1:
        return 1
    return int(given_cpus)


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
