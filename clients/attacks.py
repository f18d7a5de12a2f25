"""Simulated hostile clients, for measuring how a method holds up (run config ``attack``).

A share ``attack-fraction`` of the partitions, chosen from the run seed (``attacking_partitions``),
answers every fit with a hostile message; the others train honestly. The kinds (``core.config
.ATTACKS``):

* ``nonfinite``: a NaN in the first floating-point array;
* ``huge``: every floating-point value set to half its dtype's largest finite value, sign kept;
* ``wrong-dtype``: floating-point arrays sent one size wider (float16 -> float32, float32 ->
  float64), the first value beyond the narrower type's range (1e5, 1e300): finite as sent,
  infinite once cast to the run's dtype (a float32 extras vector under a float16 run);
* ``inflate-examples``: a claim of 10^6 training examples;
* ``bad-metrics``: a NaN training loss, a negative training time, and every other metric but the
  partition id hostile (a width of 32 bits where the name says bits, else -2^31 or NaN);
* ``sign-flip``: the update reversed, received - (trained - received);
* ``scaled-update``: the update times ``attack-scale``;
* ``crash``: fit raises; ``stall``: fit answers after ``attack-stall-seconds``.

``sign-flip`` and ``scaled-update`` poison the trained model before it is encoded
(``TrainingClient.poison``), so they reach the server as well-formed messages of the method's
own wire format; the others tamper with the encoded message.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar

from clients.base import TrainingClient
from contracts.messages import PARTITION_ID, TRAIN_LOSS, TRAIN_SECONDS
from core.config import RunConfig
from core.seeding import numpy_rng

#: salt of the attacker choice in ``core.seeding``.
ATTACK_SALT = 0xA77AC
#: example count an ``inflate-examples`` attacker claims.
INFLATED_EXAMPLES = 10**6
#: ``wrong-dtype``: each float dtype's wider type, and a value the narrower one cannot hold.
WIDER = {np.dtype(np.float16): (np.float32, 1e5), np.dtype(np.float32): (np.float64, 1e300)}


def attacking_partitions(seed: int, num_partitions: int, fraction: float) -> frozenset[int]:
    """The partitions that attack: round(fraction * n) of them (at least one when fraction > 0),
    the same for every node of a run, since each node computes it from the seed."""
    if fraction <= 0 or num_partitions < 1:
        return frozenset()
    count = min(num_partitions, max(1, round(fraction * num_partitions)))
    order = numpy_rng(seed, ATTACK_SALT).permutation(num_partitions)
    return frozenset(int(p) for p in order[:count])


def _floating(arrays: NDArrays) -> list[int]:
    return [i for i, a in enumerate(arrays) if np.issubdtype(a.dtype, np.floating) and a.size]


def nonfinite(arrays: NDArrays) -> NDArrays:
    """A NaN in the first non-empty floating-point array."""
    out = list(arrays)
    index = _floating(out)[0]
    out[index] = out[index].copy()
    out[index].reshape(-1)[0] = np.nan
    return out


def huge(arrays: NDArrays) -> NDArrays:
    """Every floating-point value at half its dtype's largest finite value, sign kept."""
    out = list(arrays)
    for i in _floating(out):
        top = np.finfo(out[i].dtype).max / 2
        out[i] = np.where(out[i] < 0, -top, top).astype(out[i].dtype)
    return out


def wrong_dtype(arrays: NDArrays) -> NDArrays:
    """Floating-point arrays one size wider, each one's first value out of the narrower range."""
    out = list(arrays)
    for i in _floating(out):
        wider, value = WIDER.get(out[i].dtype, (np.float64, 1e300))
        out[i] = out[i].astype(wider)
        out[i].reshape(-1)[0] = value
    return out


def bad_metrics(metrics: dict[str, Scalar]) -> dict[str, Scalar]:
    """NaN loss, negative time; other numbers but the partition id replaced by hostile ones."""
    out: dict[str, Scalar] = {}
    for key, value in metrics.items():
        if key == PARTITION_ID or isinstance(value, (bool, str, bytes)):
            out[key] = value
        elif isinstance(value, int):
            out[key] = 32 if "bits" in key else -(2**31)
        else:
            out[key] = float("nan")
    out[TRAIN_LOSS] = float("nan")
    out[TRAIN_SECONDS] = -1.0
    return out


Reply = tuple[NDArrays, int, dict[str, Scalar]]

#: attacks that tamper with the encoded reply (arrays, example count, metrics).
TAMPERING: dict[str, Callable[[Reply], Reply]] = {
    "nonfinite": lambda r: (nonfinite(r[0]), r[1], r[2]),
    "huge": lambda r: (huge(r[0]), r[1], r[2]),
    "wrong-dtype": lambda r: (wrong_dtype(r[0]), r[1], r[2]),
    "inflate-examples": lambda r: (r[0], INFLATED_EXAMPLES, r[2]),
    "bad-metrics": lambda r: (r[0], r[1], bad_metrics(r[2])),
}


class AttackingClient(NumPyClient):
    """Wraps an honest client and answers fits with the configured attack."""

    def __init__(self, inner: TrainingClient, cfg: RunConfig) -> None:
        self.inner = inner
        self.attack = cfg.attack
        self.stall_seconds = cfg.attack_stall_seconds
        poison = {"sign-flip": -1.0, "scaled-update": cfg.attack_scale}
        inner.poison_factor = poison.get(self.attack)

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return self.inner.get_parameters(config)

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        return self.inner.evaluate(parameters, config)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> Reply:
        if self.attack == "crash":
            raise RuntimeError("simulated attack: this client crashes in fit")
        reply = self.inner.fit(parameters, config)
        if self.attack == "stall":
            time.sleep(self.stall_seconds)
        tamper = TAMPERING.get(self.attack)
        return tamper(reply) if tamper is not None else reply
