"""The LBI-FL agent's training environment: low-bit training as an episodic MDP over schedules.

Environment (``BitWidthEnv``): central (not federated) low-bit training of a small model
(``digits-cnn-bn`` by default, converted with ``compression.lowbit.convert_to_lowbit``) on a
subset of the ``digits`` train split (the paper uses 10% of CIFAR-10; here a ``train_fraction``
of 0.3 of digits' 1,437 training images), scored on 600 other images of that split. The digits
*test* split, on which the federated runs are scored, is never touched. An episode trains E
epochs from INT4; from epoch S, every I epochs, the agent picks an action. The defaults E = 20,
S = 2, I = 1 scale the paper's 100 epochs / from 10 / every 5 so the 18 decisions fall at the same
time steps t = 0.10, 0.15, ..., 0.95. Reward of a decision (Eqs. 6-8) at the end of its I
epochs: accuracy on the held-out part vs the full-INT8 reference run at that epoch, lambda =
cumulative training BitOPs reduction against the INT8 run up to that epoch, t = epoch / E.

Training is SGD 0.05 with momentum 0.9, batch 32 (the project's default local training). That
matters: at lr 0.01 every width ends at the same accuracy on digits and no schedule is better than
INT4; at 0.05, INT4 gradients cost several points of accuracy (or derail training), while INT8
gradients with INT4 weights and activations do about as well as INT8 everywhere.

Within one environment every episode starts from the same initial weights and sees the same
mini-batches and stochastic-rounding noise in a given epoch (seeds derived from (seed, epoch)),
exactly as that environment's INT8 reference run does. So reward differences come from the
bit-width schedule, not from initialisation luck, and an episode is a deterministic function of
its schedule: ``BitWidthEnv`` keeps a bounded LRU cache of the trained model after every schedule
prefix and replays a prefix it has already trained instead of training it again (exact: model,
optimizer and quantizer state are copied whole).

Policies (``Policy``): the agent's greedy or epsilon-greedy choice, a fixed plan (teacher samples of
Section 4.4, ``teacher_schedule``), or uniform random choices.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from clients.lbi_agent import (
    ACTIONS,
    BitWidthAgent,
    action_kind,
    apply_action,
    build_state,
    valid_actions,
)
from compression import lbi_codec
from compression.lowbit import (
    INT4,
    INT8,
    KINDS,
    BitWidths,
    convert_to_lowbit,
    layer_macs,
    quantization_losses,
    reset_statistics,
    set_bit_widths,
    training_bitops,
)
from core.seeding import derive_seed
from core.torch_utils import evaluate_model, iterate_minibatches
from fl_app.data import DATASETS, load_partition
from fl_app.models import build_model
from tools.lbi_agent.learning import Transition, reward

#: the default environment dataset (``--dataset``); its test split is never touched.
DATASET = "digits"
CPU = torch.device("cpu")
#: salts separating the seed streams of one epoch (batch order vs stochastic rounding).
_ORDER_SALT = 0x0B1
_NOISE_SALT = 0x0B2
_WIRE_SALT = 0x0B3

#: Section 4.4 teacher ranges (time steps) for reaching INT8.
GRADIENT_RANGE = (0.10, 0.45)
ACTIVATION_RANGE = (0.50, 0.90)
WEIGHT_RANGE = (0.50, 0.95)


# --------------------------------------------------------------------------- environment
@dataclass(frozen=True)
class EnvConfig:
    """What one episode trains and how its decisions are scheduled and rewarded."""

    dataset: str = DATASET
    model: str = "digits-cnn-bn"
    train_fraction: float = 0.3
    heldout_size: int = 600
    epochs: int = 20
    start: int = 2
    interval: int = 1
    batch_size: int = 32
    # The project's default local training (SGD 0.05, momentum 0.9): there INT4 gradients cost
    # ~4 points of held-out accuracy while INT8 gradients alone match full INT8, so schedules
    # differ in reward (at lr 0.01 every width reaches the same accuracy on digits).
    lr: float = 0.05
    momentum: float = 0.9
    layers: str = "conv-linear"
    # The paper's (and the LBI-FL client's default) 100 iterations between scale refreshes.
    refresh_interval: int = 100
    theta: float = 0.25
    delta: float = 0.5
    seed: int = 0
    cache_size: int = 256
    #: the federated round trip: after every epoch the Conv2d/Linear weights are rounded
    #: stochastically to the k_w-bit grid (per output channel), as LBI-FL's downlink does
    #: each round; without it, low weight widths cost far less than they do in a federation.
    wire: bool = False
    #: with ``wire``: also round after every this many optimizer steps (0: once per epoch). A
    #: federated client's local round is a few steps (600 samples, batch 64: ~10), so its model
    #: passes the wire far more often than once per epoch of a central subset.
    wire_every: int = 0

    def __post_init__(self) -> None:
        if self.wire_every < 0:
            raise ValueError(f"wire_every must be >= 0 (0: once per epoch), got {self.wire_every}")
        if not 0 < self.start < self.epochs:
            raise ValueError(f"need 0 < start < epochs, got start={self.start}, {self.epochs=}")
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        if self.heldout_size < 0:
            raise ValueError(
                f"heldout_size must be >= 0 (0: all the rest), got {self.heldout_size}"
            )

    @property
    def decision_epochs(self) -> list[int]:
        """Epochs (trained so far) at which the agent decides: S, S + I, ... < E."""
        return list(range(self.start, self.epochs, self.interval))

    @property
    def decision_times(self) -> list[float]:
        return [epoch / self.epochs for epoch in self.decision_epochs]


def load_env_data(
    train_fraction: float, seed: int, heldout_size: int = 0, dataset: str = DATASET
) -> tuple[TensorDataset, TensorDataset]:
    """The train split of ``dataset`` shuffled by ``seed``: the first ``train_fraction`` trains,
    the next ``heldout_size`` images (0: all the rest) are the held-out part the rewards are
    measured on.

    Capping the held-out part bounds the evaluation that follows every decision (it costs about
    as much as training on the subset when all ~1,000 remaining images are scored)."""
    full = load_partition(
        dataset, 0, 1, partitioner="iid", alpha=1.0, labels_per_client=10, seed=seed
    )
    images, labels = full.tensors
    cut = max(1, min(len(labels) - 1, round(train_fraction * len(labels))))
    end = len(labels) if heldout_size == 0 else min(len(labels), cut + heldout_size)
    return (
        TensorDataset(images[:cut], labels[:cut]),
        TensorDataset(images[cut:end], labels[cut:end]),
    )


@dataclass
class _Snapshot:
    """The trained state after a schedule prefix: module (with its quantizer state), SGD state,
    held-out accuracy (percent) and Eq. 5 losses of its last training period."""

    model: nn.Module
    optimizer_state: dict[str, Any]
    accuracy: float
    losses: dict[str, float]


@dataclass(frozen=True)
class ReferenceRun:
    """Full-INT8 run: held-out accuracy (percent) after every epoch (index 0 = untrained)."""

    accuracy: list[float]
    bitops_per_epoch: int


@dataclass(frozen=True)
class StepResult:
    next_state: np.ndarray
    reward: float
    done: bool
    accuracy: float
    compression_ratio: float
    epoch: int


class BitWidthEnv:
    """Low-bit training of ``cfg.model`` as an episodic MDP over bit-width schedules."""

    def __init__(
        self,
        cfg: EnvConfig,
        data: tuple[TensorDataset, TensorDataset] | None = None,
    ) -> None:
        self.cfg = cfg
        self.train_set, self.heldout = data or load_env_data(
            cfg.train_fraction, cfg.seed, cfg.heldout_size, cfg.dataset
        )
        spec = DATASETS.get(cfg.dataset)
        self.input_shape = (spec.in_channels, spec.image_size, spec.image_size)
        torch.manual_seed(derive_seed(cfg.seed, 0))
        model = build_model(
            cfg.model,
            in_channels=spec.in_channels,
            num_classes=spec.num_classes,
            image_size=spec.image_size,
        )
        convert_to_lowbit(model, cfg.layers, cfg.refresh_interval)
        self.macs = sum(layer_macs(model, self.input_shape).values())
        self.samples = len(self.train_set)
        self._initial = _Snapshot(model, {}, float("nan"), dict.fromkeys(KINDS, 0.0))
        self._cache: OrderedDict[tuple[tuple[int, int, int], ...], _Snapshot] = OrderedDict()
        self.reference: ReferenceRun | None = None
        self.trained_epochs = 0  # epochs actually trained (cache misses), for the report
        self._history: tuple[tuple[int, int, int], ...] = ()
        self._current = self._initial
        self.widths = INT4
        self.last_change: dict[str, float] = {}
        self._decision = 0
        self._bitops = 0

    # ----------------------------------------------------------------- training
    def epoch_bitops(self, widths: BitWidths) -> int:
        """Training BitOPs of one epoch (every training sample once) at ``widths``."""
        return training_bitops(self.macs, widths) * self.samples

    def _train_epoch(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, weight_bits: int
    ) -> None:
        """One epoch; with ``wire`` the weights pass the k_w-bit wire every ``wire_every`` steps
        (if > 0) and at the end of the epoch."""
        torch.manual_seed(derive_seed(self.cfg.seed, epoch, _NOISE_SALT))
        order = torch.Generator().manual_seed(derive_seed(self.cfg.seed, epoch, _ORDER_SALT))
        model.train()
        wire = self.cfg.wire and weight_bits < 32  # FP32 weights go down as float32
        batches = iterate_minibatches(self.train_set, self.cfg.batch_size, order, CPU)
        for step, (images, labels) in enumerate(batches, start=1):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            if wire and self.cfg.wire_every and step % self.cfg.wire_every == 0:
                self._round_trip(model, weight_bits, epoch, step)
        if wire:
            self._round_trip(model, weight_bits, epoch)

    def _round_trip(self, model: nn.Module, bits: int, epoch: int, step: int = 0) -> None:
        """Weights through the k_w-bit wire (``wire``): stochastic rounding, channel scales."""
        salt = derive_seed(self.cfg.seed, epoch, _WIRE_SALT)
        generator = torch.Generator().manual_seed(derive_seed(salt, step) if step else salt)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() < 2:
                    continue
                codes, scales = lbi_codec.quantize_weights(
                    [parameter.detach().numpy()], bits, "stochastic", generator
                )
                rounded = codes.astype(np.float32).reshape(len(scales), -1) * scales[:, None]
                parameter.copy_(torch.from_numpy(rounded.reshape(parameter.shape)))

    def _advance(self, widths: BitWidths, epochs: int) -> _Snapshot:
        """Train ``epochs`` more epochs at ``widths`` from the current prefix (or replay them)."""
        key = self._history + (widths.as_tuple(),) * epochs
        snapshot = self._cache.get(key)
        if snapshot is None:
            model = copy.deepcopy(self._current.model)
            optimizer = torch.optim.SGD(
                model.parameters(), lr=self.cfg.lr, momentum=self.cfg.momentum
            )
            if self._current.optimizer_state:
                optimizer.load_state_dict(copy.deepcopy(self._current.optimizer_state))
            set_bit_widths(model, widths)
            reset_statistics(model)
            for epoch in range(len(self._history), len(key)):
                self._train_epoch(model, optimizer, epoch, widths.weight)
            self.trained_epochs += epochs
            accuracy = 100.0 * evaluate_model(model, self.heldout, CPU)[1]
            snapshot = _Snapshot(
                model, copy.deepcopy(optimizer.state_dict()), accuracy, quantization_losses(model)
            )
            self._cache[key] = snapshot
            while len(self._cache) > self.cfg.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        self._history = key
        self._current = snapshot
        self._bitops += self.epoch_bitops(widths) * epochs
        return snapshot

    def constant_run(self, widths: BitWidths) -> list[float]:
        """Held-out accuracy after every epoch (index 0 = untrained) of E epochs at ``widths``
        from the episodes' initial weights (same batches and noise as every episode)."""
        self._history, self._current, self._bitops = (), self._initial, 0
        accuracy = [float("nan")]
        for _ in range(self.cfg.epochs):
            accuracy.append(self._advance(widths, 1).accuracy)
        return accuracy

    def run_reference(self) -> ReferenceRun:
        """Train full INT8 for E epochs from the episodes' initial weights; store a_r per epoch."""
        self.reference = ReferenceRun(self.constant_run(INT8), self.epoch_bitops(INT8))
        return self.reference

    # ----------------------------------------------------------------- MDP
    @property
    def epoch(self) -> int:
        return len(self._history)

    def compression_ratio(self) -> float:
        """lambda: cumulative BitOPs reduction vs the INT8 run over the epochs trained so far."""
        return 1.0 - self._bitops / (self.epoch_bitops(INT8) * max(self.epoch, 1))

    def _state(self) -> np.ndarray:
        return build_state(
            self.epoch / self.cfg.epochs, self.widths, self._current.losses, self.last_change
        )

    def reset(self) -> np.ndarray:
        """Start an episode at INT4, train to the first decision epoch S, return the state."""
        if self.reference is None:
            self.run_reference()
        self._history, self._current, self._bitops = (), self._initial, 0
        self.widths = INT4
        self.last_change = dict.fromkeys(KINDS, -1.0)
        self._decision = 0
        self._advance(INT4, self.cfg.start)
        return self._state()

    def step(self, action: int) -> StepResult:
        """Apply ``action`` at the current decision epoch, train to the next one, reward it."""
        epochs = self.cfg.decision_epochs
        if self._decision >= len(epochs) or self.epoch != epochs[self._decision]:
            raise RuntimeError("step() called outside an episode; call reset() first")
        new_widths = apply_action(self.widths, action)
        kind = action_kind(action)
        if kind is not None:
            self.last_change[kind] = self.epoch / self.cfg.epochs
        self.widths = new_widths
        self._decision += 1
        end = epochs[self._decision] if self._decision < len(epochs) else self.cfg.epochs
        snapshot = self._advance(new_widths, end - self.epoch)
        assert self.reference is not None
        ratio = self.compression_ratio()
        value = reward(
            snapshot.accuracy,
            self.reference.accuracy[end],
            ratio,
            end / self.cfg.epochs,
            theta=self.cfg.theta,
            delta=self.cfg.delta,
        )
        return StepResult(
            self._state(), value, end == self.cfg.epochs, snapshot.accuracy, ratio, end
        )


# --------------------------------------------------------------------------- episodes
Policy = Callable[[np.ndarray, BitWidths, int], int]
"""(state, widths, decision index) -> action."""


@dataclass
class Episode:
    """One finished episode: its transitions and what the log and the report need."""

    transitions: list[Transition]
    accuracy: float
    reference_accuracy: float
    compression_ratio: float
    widths: BitWidths
    schedule: list[tuple[float, str]] = field(default_factory=list)

    @property
    def total_reward(self) -> float:
        return float(sum(t.reward for t in self.transitions))

    def log_record(self, **extra: Any) -> dict[str, Any]:
        return {
            **extra,
            "widths": list(self.widths.as_tuple()),
            "accuracy": round(self.accuracy, 3),
            "reference_accuracy": round(self.reference_accuracy, 3),
            "rr": round(100.0 * self.compression_ratio, 3),
            "return": round(self.total_reward, 5),
            "schedule": [[round(t, 4), name] for t, name in self.schedule],
        }


def run_episode(env: BitWidthEnv, policy: Policy) -> Episode:
    """Play one episode of ``policy`` in ``env``; the schedule lists the raises (t, action)."""
    state = env.reset()
    transitions: list[Transition] = []
    schedule: list[tuple[float, str]] = []
    index = 0
    while True:
        widths = env.widths
        action = int(policy(state, widths, index))
        if action:
            schedule.append((env.epoch / env.cfg.epochs, ACTIONS[action]))
        result = env.step(action)
        transitions.append(
            Transition(
                state,
                action,
                result.reward,
                result.next_state,
                result.done,
                valid_actions(env.widths),
            )
        )
        state = result.next_state
        index += 1
        if result.done:
            break
    assert env.reference is not None
    return Episode(
        transitions,
        result.accuracy,
        env.reference.accuracy[-1],
        result.compression_ratio,
        env.widths,
        schedule,
    )


def teacher_schedule(
    decision_times: Sequence[float],
    rng: np.random.Generator,
    weight_keep_prob: float = 0.5,
    weight_range: tuple[float, float] = WEIGHT_RANGE,
    gradient_keep_prob: float = 0.0,
    activation_keep_prob: float = 0.0,
) -> dict[int, int]:
    """A Section 4.4 teacher sample as {decision index: action}.

    Each kind going to INT8 reaches it at a time drawn uniformly within its range (gradients
    [0.10, 0.45], activations [0.50, 0.90], weights ``weight_range``, by default the paper's
    [0.50, 0.95], or, with probability ``weight_keep_prob``, kept at INT4). The paper's ranges
    suit central training, where weights matter last; where the weights also cross a low-bit
    wire every round (federated LBI-FL), an earlier weight range lets the teacher show the
    agent the raise that pays there. INT4 -> INT8 takes two +2 raises at two decisions of the
    range that no earlier kind took: the decision that reaches INT8 is drawn among those that
    leave a free decision before it in the range, and the first raise goes to the latest such
    free decision. Kinds are placed in the order gradient, activation, weight; a kind whose range
    holds fewer than two free decisions is left at INT4 (never moved outside its range).

    ``gradient_keep_prob`` / ``activation_keep_prob`` (0: the paper's teacher, which always
    raises both) keep those kinds at INT4 with that probability, so the teacher's samples also
    hold schedules that skip raises the rewards may not pay for; a probability of 0 draws
    nothing, so the default stream of samples is the paper teacher's.
    """
    times = np.asarray(decision_times)
    plan: dict[int, int] = {}
    ranges = [
        (kind, bounds)
        for kind, bounds, keep in (
            ("gradient", GRADIENT_RANGE, gradient_keep_prob),
            ("activation", ACTIVATION_RANGE, activation_keep_prob),
        )
        if not (keep > 0 and rng.random() < keep)
    ]
    if rng.random() >= weight_keep_prob:
        ranges.append(("weight", weight_range))
    for kind, (low, high) in ranges:
        free = [
            int(i)
            for i in np.flatnonzero((times >= low - 1e-9) & (times <= high + 1e-9))
            if int(i) not in plan
        ]
        if len(free) < 2:
            continue
        second = int(rng.choice(free[1:]))
        first = max(i for i in free if i < second)
        plan[first] = plan[second] = 1 + KINDS.index(kind)
    return plan


def plan_policy(plan: dict[int, int]) -> Policy:
    """Follow a {decision index: action} plan, keeping wherever the plan says nothing."""

    def policy(state: np.ndarray, widths: BitWidths, index: int) -> int:
        action = plan.get(index, 0)
        return action if valid_actions(widths)[action] else 0

    return policy


def agent_policy(
    agent: BitWidthAgent, epsilon: float = 0.0, rng: np.random.Generator | None = None
) -> Policy:
    return lambda state, widths, index: agent.act(state, widths, epsilon, rng)


def uniform_random_policy(rng: np.random.Generator) -> Policy:
    """Uniform draw among the valid actions at every decision (raises everything early)."""
    return lambda state, widths, index: int(rng.choice(np.flatnonzero(valid_actions(widths))))


def matched_random_plan(
    raises: Sequence[int], decisions: int, rng: np.random.Generator
) -> dict[int, int]:
    """The same raises as ``raises`` (so about the same BitOPs budget) at random decisions."""
    slots = np.sort(rng.choice(decisions, size=len(raises), replace=False))
    order = rng.permutation(np.asarray(raises, dtype=np.int64))
    return {int(slot): int(action) for slot, action in zip(slots, order, strict=True)}
