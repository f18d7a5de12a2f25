"""Per-process caches of the ClientApp: partition tensors and model skeletons, built once, bounded.

Flower calls ``client_fn`` for every message. In simulation the same Ray worker process serves
message after message (of many clients), so rebuilding the partition's tensors and the model
every time is pure framework overhead (a ResNet's random initialisation alone costs more than a
small client's round). This module keeps, per process:

* **partitions**: the ``TensorDataset`` of a partition, keyed by every argument that decides it
  (dataset, partitioner and its settings, seed, partition id, number of partitions, data files).
  Clients only read it (mini-batches are copies), so one object is shared. Bounded by entries
  and bytes (LRU).
* **models**: a built model per (model, input shape, classes, method and its settings, device),
  lent to one client at a time. A model is lent again only after the client that held it has
  been garbage-collected (a ``weakref.finalize`` lease), so two live clients never share one,
  whatever order their calls come in. Before it is lent again the model is put back exactly as
  it was built: every ``state_dict`` entry (parameters and buffers, BatchNorm statistics and
  ``num_batches_tracked`` included), ``requires_grad`` flags, gradients dropped, train/eval
  mode, and the low-bit layers of LBI-FL back to their just-converted state
  (``compression.lowbit.reset_lowbit_state``). The message then installs the round's weights
  as for a fresh model. A model with hooks left on it is never lent again.

What a method converts in place (LBI-FL's Conv2d/Linear -> low-bit layers) stays converted: the
key holds the method and its settings, so only the same conversion ever sees it again.
``tests/test_worker_cache.py`` checks that a worker serving partitions 0, 1, 0 gives bit for bit
what fresh builds give.

``COMMFL_WORKER_CACHE=0`` in the environment (read at every call) or ``set_enabled(False)``
turns both caches off: every message builds its data and model afresh.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import TensorDataset

from compression.lowbit import reset_lowbit_state

ENV_VAR = "COMMFL_WORKER_CACHE"
#: a worker rarely serves more clients than this; partitions are small next to a model.
MAX_PARTITIONS = 128
MAX_PARTITION_BYTES = 1 << 30
#: models held in all (one per key unless clients overlap); a ResNet-18 is 45 MB.
MAX_MODELS = 4
MAX_MODELS_PER_KEY = 2
#: seconds between two garbage collections for one key (``WorkerCache.lease_model``).
GC_QUIET_SECONDS = 5.0

_forced: bool | None = None


def set_enabled(enabled: bool | None) -> None:
    """Force the caches on or off for this process; None: follow ``COMMFL_WORKER_CACHE``."""
    global _forced
    _forced = enabled


def enabled() -> bool:
    if _forced is not None:
        return _forced
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


@contextmanager
def disabled() -> Iterator[None]:
    """Run a block with the caches off (tests comparing with fresh builds)."""
    previous = _forced
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


def tensor_bytes(data: TensorDataset) -> int:
    return sum(t.element_size() * t.nelement() for t in data.tensors)


@dataclass
class _ModelSlot:
    """One cached model and what it looked like when built."""

    model: nn.Module
    snapshot: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    training: dict[str, bool]
    hooks: int
    in_use: bool = True


@dataclass
class CacheStats:
    partition_hits: int = 0
    partition_misses: int = 0
    model_hits: int = 0
    model_misses: int = 0
    #: models built outside the cache (cache off, or every cached one lent out).
    model_uncached: int = 0


def _hook_count(model: nn.Module) -> int:
    """Hooks registered on the model's modules (a user that leaves one changes the model)."""
    return sum(
        len(module._forward_hooks)
        + len(module._forward_pre_hooks)
        + len(module._backward_hooks)
        + len(module._backward_pre_hooks)
        + len(module._state_dict_hooks)
        + len(module._load_state_dict_pre_hooks)
        for module in model.modules()
    )


class WorkerCache:
    """The two bounded caches of one process (module docstring)."""

    def __init__(
        self,
        max_partitions: int = MAX_PARTITIONS,
        max_partition_bytes: int = MAX_PARTITION_BYTES,
        max_models: int = MAX_MODELS,
        max_models_per_key: int = MAX_MODELS_PER_KEY,
    ) -> None:
        self.max_partitions = max_partitions
        self.max_partition_bytes = max_partition_bytes
        self.max_models = max_models
        self.max_models_per_key = max_models_per_key
        self._partitions: OrderedDict[Hashable, TensorDataset] = OrderedDict()
        self._partition_bytes = 0
        self._models: OrderedDict[Hashable, list[_ModelSlot]] = OrderedDict()
        self._lock = threading.RLock()
        self.stats = CacheStats()
        #: key -> until when a futile garbage collection is not repeated (``lease_model``).
        self._gc_quiet: dict[Hashable, float] = {}

    # ----------------------------------------------------------------- partitions
    def partition(self, key: Hashable, build: Callable[[], TensorDataset]) -> TensorDataset:
        """The partition of ``key``, built by ``build`` on a miss. Callers must not modify it."""
        if not enabled():
            return build()
        with self._lock:
            cached = self._partitions.get(key)
            if cached is not None:
                self._partitions.move_to_end(key)
                self.stats.partition_hits += 1
                return cached
        data = build()
        size = tensor_bytes(data)
        with self._lock:
            self.stats.partition_misses += 1
            if size > self.max_partition_bytes or key in self._partitions:
                return data
            self._partitions[key] = data
            self._partition_bytes += size
            while self._partitions and (
                len(self._partitions) > self.max_partitions
                or self._partition_bytes > self.max_partition_bytes
            ):
                _, evicted = self._partitions.popitem(last=False)
                self._partition_bytes -= tensor_bytes(evicted)
        return data

    # ----------------------------------------------------------------- models
    def lease_model(
        self, key: Hashable, build: Callable[[], nn.Module]
    ) -> tuple[nn.Module, Callable[[], None]]:
        """A model for ``key`` in its as-built state, and the function that gives it back.

        Bind the release to the model's user with ``bind`` (or call it when done).
        """
        if not enabled():
            self.stats.model_uncached += 1
            return build(), _nothing
        slot = self._take(key)
        if (
            slot is None
            and self._models.get(key)
            and time.monotonic() >= self._gc_quiet.get(key, 0)
        ):
            # All lent: a finished client in a reference cycle may still hold one. A full
            # collection costs ~0.2 s in a large heap (the in-process runner's), more than
            # building most models, so it runs at most once per GC_QUIET_SECONDS per key.
            gc.collect()
            self._gc_quiet[key] = time.monotonic() + GC_QUIET_SECONDS
            slot = self._take(key)
        if slot is not None:
            return slot.model, _releaser(slot)
        with self._lock:
            full = len(self._models.get(key, ())) >= self.max_models_per_key
        model = build()
        if full:
            self.stats.model_uncached += 1
            return model, _nothing
        slot = _ModelSlot(
            model,
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            {name: p.requires_grad for name, p in model.named_parameters()},
            {name: m.training for name, m in model.named_modules()},
            _hook_count(model),
        )
        with self._lock:
            self.stats.model_misses += 1
            self._models.setdefault(key, []).append(slot)
            self._models.move_to_end(key)
            self._evict_models()
        return model, _releaser(slot)

    def _take(self, key: Hashable) -> _ModelSlot | None:
        """A free slot of ``key``, reset to its as-built state and marked lent; None if none."""
        with self._lock:
            slots = self._models.get(key, [])
            for slot in list(slots):
                if slot.in_use:
                    continue
                if _hook_count(slot.model) != slot.hooks:  # hooks left on it: never lend again
                    slots.remove(slot)
                    continue
                slot.in_use = True
                self._models.move_to_end(key)
                break
            else:
                return None
        try:
            _restore(slot)
        except Exception:
            with self._lock:
                if slot in slots:
                    slots.remove(slot)
            return None
        with self._lock:
            self.stats.model_hits += 1
        return slot

    def _evict_models(self) -> None:
        """Drop free models of the least recently used keys while more than ``max_models``."""
        total = sum(len(slots) for slots in self._models.values())
        for key in list(self._models):
            if total <= self.max_models:
                break
            slots = self._models[key]
            for slot in [s for s in slots if not s.in_use]:
                if total <= self.max_models:
                    break
                slots.remove(slot)
                total -= 1
            if not slots:
                del self._models[key]

    @staticmethod
    def bind(owner: object, release: Callable[[], None]) -> None:
        """Give the leased model back when ``owner`` (the client holding it) is collected."""
        weakref.finalize(owner, release)

    def clear(self) -> None:
        with self._lock:
            self._partitions.clear()
            self._partition_bytes = 0
            self._models.clear()
            self.stats = CacheStats()

    def sizes(self) -> tuple[int, int]:
        """(cached partitions, cached models)."""
        with self._lock:
            return len(self._partitions), sum(len(s) for s in self._models.values())


def _nothing() -> None:
    return None


def _releaser(slot: _ModelSlot) -> Callable[[], None]:
    def release() -> None:
        # A plain attribute store: safe from a finalizer running inside a locked section.
        slot.in_use = False

    return release


@torch.no_grad()
def _restore(slot: _ModelSlot) -> None:
    """Put the model back as it was built (module docstring)."""
    model = slot.model
    model.load_state_dict(slot.snapshot, strict=True)
    for name, parameter in model.named_parameters():
        parameter.grad = None
        parameter.requires_grad_(slot.requires_grad[name])
    for name, module in model.named_modules():
        module.training = slot.training.get(name, True)
    reset_lowbit_state(model)


#: the cache of this process (used by ``fl_app.client_app.client_fn``).
CACHE = WorkerCache()
