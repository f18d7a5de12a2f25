"""Seeds: one run seed fixes the data split, the initial model, sampling and every local step.

Every random stream of a run is seeded through ``derive_seed`` from the run seed and the
integers that tell streams apart (round, partition, a salt per use), so streams are independent,
repeatable on any worker, and never overflow a generator's seed range whatever the run seed.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several non-negative integers (run seed, client id, round,
    a salt); any size of integer is fine."""
    state = np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def torch_generator(*parts: int) -> torch.Generator:
    """A CPU torch generator seeded by ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def numpy_rng(*parts: int) -> np.random.Generator:
    """A NumPy generator seeded by ``derive_seed(*parts)``."""
    return np.random.default_rng(derive_seed(*parts))
