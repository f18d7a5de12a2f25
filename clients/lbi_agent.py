"""The LBI-FL bit-width agent (paper Section 4.3-4.4): state, actions, reward, Q-network, DQN.

Pure torch/NumPy (no Flower): the client imports it to take decisions, and the training command
``fl_app.train_lbi_agent`` imports it to learn the Q-network.

State (``STATE_SIZE`` = 10 floats, in this order; ``STATE_SPEC`` names them):

====  ==========================  ===========================================================
idx   name                        value
====  ==========================  ===========================================================
0     ``time``                    training progress t = epoch (or round) / total, in [0, 1]
1-3   ``bits-{w,a,g}``            current bit-width / 8 (INT4 0.5, INT6 0.75, INT8 1.0; FP32 4.0)
4-6   ``loss-{w,a,g}``            Eq. 5 quantization loss of the last training period, as is
7-9   ``changed-{w,a,g}``         time step t of the kind's last raise, -1 if never raised
====  ==========================  ===========================================================

Widths are divided by 8 so the largest width the agent can choose maps to 1, the scale of the
other features. Eq. 5 losses enter unscaled: they are already relative errors (dimensionless),
which is what lets the agent move between models and datasets (Section 4.3 excludes features tied
to a model or dataset). ``w, a, g`` follow ``compression.lowbit.KINDS``.

Actions: ``ACTIONS`` = keep, or raise the weight / activation / gradient width by 2. Widths start
at INT4 and never go down; a raise that would pass 8 bits is invalid (``valid_actions``), and the
agent only ever picks among valid actions.

Reward (Eqs. 6-8): ``q_idx * a_idx * t`` with q_idx = theta / (1 - lambda), lambda the BitOPs
reduction against full INT8 training (0 at INT8, 0.75 at INT4), and a_idx = 1 when the accuracy
beats the INT8 run's accuracy at the same epoch, 1 / (1 + (a_r - a) * delta) otherwise (accuracies
in percent, so with delta = 0.5 one point of accuracy lost costs as much as a factor 1.5 of q_idx).

Learning: ``QNetwork`` (10 -> 128 -> ReLU -> 4, 1,924 parameters: the paper's "1.92K") is first
fitted to teacher episodes with the behaviour-cloning loss of Eq. 9 (``bc_loss``), then trained
by DQN (``dqn_loss``: replay buffer, periodically copied target network, TD target maximised over
the *valid* next actions only). Following Goecks et al. (2020), which the paper cites for BC "as a
regularization", ``DQNTrainer`` can keep the Eq. 9 term on teacher samples, weighted by
``bc_weight``, in every DQN update, so exploration refines the teacher's schedules instead of
forgetting them after a few noisy episodes.

Returns: Eq. 9 regresses q(s, a) on the Monte-Carlo return of the teacher sample. It is computed
here with the same discount gamma as the DQN target (``discounted_returns``), so that BC fits the
quantity DQN keeps estimating; with gamma = 1 it is the paper's plain sum of rewards.

The agent is stored as JSON (``BitWidthAgent.save``), because a Flower app bundle only carries
``*.py``, ``*.toml``, ``*.md`` and ``*.json`` files.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from compression.lowbit import KINDS, BitWidths

STATE_SIZE = 10
HIDDEN_SIZE = 128
ACTIONS: tuple[str, ...] = ("keep", "raise-weight", "raise-activation", "raise-gradient")
NUM_ACTIONS = len(ACTIONS)
#: bits added by a raise and the largest width the agent may reach (INT4 -> INT6 -> INT8).
BIT_STEP = 2
MAX_BITS = 8
#: widths are divided by this in the state (INT8 -> 1.0).
BITS_SCALE = 8.0
#: value of a "last changed" feature for a kind that was never raised.
NEVER_CHANGED = -1.0
_SHORT = {"weight": "w", "activation": "a", "gradient": "g"}
STATE_SPEC: tuple[str, ...] = (
    "time",
    *(f"bits-{_SHORT[k]}" for k in KINDS),
    *(f"loss-{_SHORT[k]}" for k in KINDS),
    *(f"changed-{_SHORT[k]}" for k in KINDS),
)
FORMAT_NAME = "lbi-fl-bit-width-agent"
FORMAT_VERSION = 1
DEFAULT_AGENT_PATH = Path(__file__).with_name("lbi_agent.json")


# --------------------------------------------------------------------------- state and actions
def build_state(
    time_step: float,
    widths: BitWidths,
    losses: Mapping[str, float],
    last_change: Mapping[str, float],
) -> np.ndarray:
    """The 10-float state of the module docstring's table (float32).

    ``losses`` and ``last_change`` are keyed by ``KINDS``; a missing loss (e.g. a kind at FP32
    that recorded nothing) counts as 0, a missing change time as never changed.
    """
    state = [float(time_step)]
    state += [widths.get(kind) / BITS_SCALE for kind in KINDS]
    state += [float(losses.get(kind, 0.0)) for kind in KINDS]
    state += [float(last_change.get(kind, NEVER_CHANGED)) for kind in KINDS]
    return np.asarray(state, dtype=np.float32)


def action_kind(action: int) -> str | None:
    """The tensor kind an action raises; None for keep."""
    _check_action_index(action)
    return None if action == 0 else KINDS[action - 1]


def _check_action_index(action: int) -> None:
    if isinstance(action, bool) or not isinstance(action, int | np.integer):
        raise ValueError(f"action must be an integer index into ACTIONS, got {action!r}")
    if not 0 <= int(action) < NUM_ACTIONS:
        raise ValueError(f"action must be in 0..{NUM_ACTIONS - 1} ({ACTIONS}), got {action}")


def valid_actions(widths: BitWidths) -> np.ndarray:
    """Boolean mask over ``ACTIONS``: keep always; raising a kind only while it stays <= 8 bits.

    FP32 (32 bits) counts as above 8, so a full-precision kind is never "raised".
    """
    mask = np.ones(NUM_ACTIONS, dtype=bool)
    for index, kind in enumerate(KINDS, start=1):
        mask[index] = widths.get(kind) + BIT_STEP <= MAX_BITS
    return mask


def apply_action(widths: BitWidths, action: int) -> BitWidths:
    """Widths after ``action``; ValueError for an unknown or invalid (masked) action."""
    kind = action_kind(action)
    if not valid_actions(widths)[int(action)]:
        raise ValueError(
            f"action {ACTIONS[int(action)]!r} is invalid at widths {widths}: "
            f"a width may not exceed {MAX_BITS} bits"
        )
    if kind is None:
        return widths
    return widths.replace(kind, widths.get(kind) + BIT_STEP)


# --------------------------------------------------------------------------- reward
def reward(
    accuracy: float,
    reference_accuracy: float,
    compression_ratio: float,
    time_step: float,
    theta: float = 0.25,
    delta: float = 0.5,
) -> float:
    """Eq. 6: q_idx * a_idx * t, with Eq. 7 q_idx = theta / (1 - lambda) and Eq. 8 a_idx.

    ``accuracy`` and ``reference_accuracy`` (the full-INT8 run at the same epoch) are in
    percent; ``compression_ratio`` is lambda, the BitOPs reduction vs INT8 in [0, 1).
    """
    if not compression_ratio < 1.0:
        raise ValueError(f"compression_ratio (lambda) must be < 1, got {compression_ratio}")
    q_idx = theta / (1.0 - compression_ratio)
    if accuracy > reference_accuracy:
        a_idx = 1.0
    else:
        a_idx = 1.0 / (1.0 + (reference_accuracy - accuracy) * delta)
    return float(q_idx * a_idx * time_step)


def discounted_returns(rewards: Sequence[float], gamma: float) -> np.ndarray:
    """Return-to-go G_k = sum_j>=k gamma^(j-k) r_j of every step of one episode."""
    returns = np.zeros(len(rewards), dtype=np.float64)
    running = 0.0
    for index in range(len(rewards) - 1, -1, -1):
        running = float(rewards[index]) + gamma * running
        returns[index] = running
    return returns.astype(np.float32)


# --------------------------------------------------------------------------- networks
class QNetwork(nn.Module):
    """One hidden layer of 128 (Section 4.3): small enough that a decision costs nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(STATE_SIZE, HIDDEN_SIZE), nn.ReLU(), nn.Linear(HIDDEN_SIZE, NUM_ACTIONS)
        )

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.net(states)


def masked_argmax(q_values: np.ndarray, mask: np.ndarray) -> int:
    """Index of the largest Q-value among the valid actions (ties: the lowest index, so keep
    wins a tie and the agent never raises without a reason)."""
    masked = np.where(mask, q_values, -np.inf)
    return int(np.argmax(masked))


class BitWidthAgent:
    """A Q-network plus the metadata saved with it; picks actions among the valid ones."""

    def __init__(self, q_net: QNetwork | None = None, metadata: dict[str, Any] | None = None):
        self.q_net = q_net if q_net is not None else QNetwork()
        self.q_net.eval()
        self.metadata: dict[str, Any] = dict(metadata or {})

    @torch.no_grad()
    def q_values(self, state: np.ndarray) -> np.ndarray:
        """Q-values of every action at ``state`` (shape (4,))."""
        tensor = torch.as_tensor(np.asarray(state, dtype=np.float32)).reshape(1, STATE_SIZE)
        return self.q_net(tensor)[0].numpy().astype(np.float64)

    def act(
        self,
        state: np.ndarray,
        widths: BitWidths,
        epsilon: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> int:
        """Greedy valid action; with probability ``epsilon`` a uniform draw among valid actions.

        ``rng`` drives the exploration (a fresh unseeded generator if omitted and needed).
        """
        mask = valid_actions(widths)
        if epsilon > 0.0:
            rng = rng if rng is not None else np.random.default_rng()
            if rng.random() < epsilon:
                return int(rng.choice(np.flatnonzero(mask)))
        return masked_argmax(self.q_values(state), mask)

    # ----------------------------------------------------------------- persistence
    def to_json(self) -> dict[str, Any]:
        """Weights as nested lists (float32 values written exactly) plus the format header."""
        weights = {
            name: tensor.detach().cpu().to(torch.float32).tolist()
            for name, tensor in self.q_net.state_dict().items()
        }
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "state_size": STATE_SIZE,
            "state_spec": list(STATE_SPEC),
            "actions": list(ACTIONS),
            "hidden_size": HIDDEN_SIZE,
            "metadata": self.metadata,
            "weights": weights,
        }

    def save(self, path: str | Path) -> None:
        """Write the agent as JSON (Flower app bundles ship *.json, not *.pt)."""
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> BitWidthAgent:
        """Rebuild an agent; refuses files of another format or with another state/action layout,
        since a Q-network read against the wrong layout would act on garbage silently."""
        if payload.get("format") != FORMAT_NAME or payload.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"not a {FORMAT_NAME} v{FORMAT_VERSION} file "
                f"(format={payload.get('format')!r}, version={payload.get('version')!r})"
            )
        if list(payload.get("state_spec", [])) != list(STATE_SPEC):
            raise ValueError(f"state layout {payload.get('state_spec')} != {list(STATE_SPEC)}")
        if list(payload.get("actions", [])) != list(ACTIONS):
            raise ValueError(f"actions {payload.get('actions')} != {list(ACTIONS)}")
        q_net = QNetwork()
        expected = q_net.state_dict()
        weights = payload["weights"]
        if set(weights) != set(expected):
            raise ValueError(f"weights {sorted(weights)} != {sorted(expected)}")
        state = {}
        for name, reference in expected.items():
            tensor = torch.tensor(weights[name], dtype=torch.float32)
            if tensor.shape != reference.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(reference.shape)}")
            state[name] = tensor
        q_net.load_state_dict(state)
        return cls(q_net, dict(payload.get("metadata", {})))

    @classmethod
    def load(cls, path: str | Path) -> BitWidthAgent:
        """Read an agent written by ``save``."""
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


def load_default_agent() -> BitWidthAgent:
    """The agent shipped next to this module (``clients/lbi_agent.json``)."""
    return BitWidthAgent.load(DEFAULT_AGENT_PATH)


# --------------------------------------------------------------------------- experience
@dataclass(frozen=True)
class Transition:
    """One decision: s, a, r, s', whether s' ends the episode, and the valid actions at s'."""

    state: np.ndarray
    action: int
    reward: float
    next_state: np.ndarray
    done: bool
    next_valid: np.ndarray


@dataclass(frozen=True)
class Batch:
    """Stacked transitions as tensors (what the losses take)."""

    states: torch.Tensor  # (B, STATE_SIZE) float32
    actions: torch.Tensor  # (B,) int64
    rewards: torch.Tensor  # (B,) float32
    next_states: torch.Tensor  # (B, STATE_SIZE) float32
    dones: torch.Tensor  # (B,) float32, 1.0 at the last step
    next_valid: torch.Tensor  # (B, NUM_ACTIONS) bool

    @classmethod
    def of(cls, transitions: Sequence[Transition]) -> Batch:
        return cls(
            states=torch.as_tensor(np.stack([t.state for t in transitions]), dtype=torch.float32),
            actions=torch.as_tensor([int(t.action) for t in transitions], dtype=torch.int64),
            rewards=torch.as_tensor([t.reward for t in transitions], dtype=torch.float32),
            next_states=torch.as_tensor(
                np.stack([t.next_state for t in transitions]), dtype=torch.float32
            ),
            dones=torch.as_tensor([float(t.done) for t in transitions], dtype=torch.float32),
            next_valid=torch.as_tensor(np.stack([t.next_valid for t in transitions])).bool(),
        )


class ReplayBuffer:
    """Fixed-capacity ring of transitions sampled uniformly (decorrelates DQN's batches)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: list[Transition] = []
        self._next = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, transition: Transition) -> None:
        if len(self._items) < self.capacity:
            self._items.append(transition)
        else:
            self._items[self._next] = transition
        self._next = (self._next + 1) % self.capacity

    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        if not self._items:
            raise ValueError("cannot sample from an empty replay buffer")
        index = rng.integers(0, len(self._items), size=batch_size)
        return Batch.of([self._items[i] for i in index])


@dataclass(frozen=True)
class TeacherSamples:
    """D_T of Eq. 9: teacher states, actions, Monte-Carlo returns and pi_T(.|s) rows."""

    states: np.ndarray  # (N, STATE_SIZE) float32
    actions: np.ndarray  # (N,) int64
    returns: np.ndarray  # (N,) float32
    probs: np.ndarray  # (N, NUM_ACTIONS) float32, rows sum to 1

    @classmethod
    def from_episodes(
        cls, episodes: Sequence[Sequence[Transition]], gamma: float
    ) -> TeacherSamples:
        """Teacher episodes with one-hot pi_T: a teacher sample takes one action at s.

        Where several teacher samples share a state, the sum of their one-hot KL terms has the
        gradient of the KL to their empirical action distribution, so one-hot rows suffice.
        """
        states, actions, returns = [], [], []
        for episode in episodes:
            returns.append(discounted_returns([t.reward for t in episode], gamma))
            states += [t.state for t in episode]
            actions += [int(t.action) for t in episode]
        action_array = np.asarray(actions, dtype=np.int64)
        probs = np.zeros((len(actions), NUM_ACTIONS), dtype=np.float32)
        probs[np.arange(len(actions)), action_array] = 1.0
        return cls(
            states=np.stack(states).astype(np.float32),
            actions=action_array,
            returns=np.concatenate(returns).astype(np.float32),
            probs=probs,
        )

    def __len__(self) -> int:
        return len(self.actions)

    def sample(
        self, batch_size: int, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        index = rng.integers(0, len(self.actions), size=batch_size)
        return (
            torch.as_tensor(self.states[index]),
            torch.as_tensor(self.actions[index]),
            torch.as_tensor(self.returns[index]),
            torch.as_tensor(self.probs[index]),
        )


# --------------------------------------------------------------------------- losses
def bc_loss(
    q_net: nn.Module,
    states: torch.Tensor,
    actions: torch.Tensor,
    returns: torch.Tensor,
    teacher_probs: torch.Tensor | None = None,
    kl_weight: float = 1.0,
) -> torch.Tensor:
    """Eq. 9: mean (G - q(s, a))^2 + kl_weight * mean KL(pi_T(.|s) || softmax(q(s, .))).

    The squared error alone would fit the teacher's values but not prefer its actions (other
    actions' Q-values are never seen); the KL term makes the teacher's action the argmax.
    ``teacher_probs`` defaults to one-hot rows of ``actions``; 0 * log 0 counts as 0.
    """
    q_all = q_net(states)
    q_taken = q_all.gather(1, actions.view(-1, 1)).squeeze(1)
    value_term = functional.mse_loss(q_taken, returns)
    if teacher_probs is None:
        teacher_probs = functional.one_hot(actions, NUM_ACTIONS).to(q_all.dtype)
    log_policy = functional.log_softmax(q_all, dim=1)
    safe_log_teacher = torch.log(torch.where(teacher_probs > 0, teacher_probs, 1.0))
    kl = (teacher_probs * (safe_log_teacher - log_policy)).sum(dim=1).mean()
    return value_term + kl_weight * kl


@torch.no_grad()
def td_targets(target_net: nn.Module, batch: Batch, gamma: float) -> torch.Tensor:
    """r + gamma * max over *valid* a' of q_target(s', a'); just r at the end of an episode.

    Masking matters: an invalid raise never happens, so its (untrained) Q-value must not leak
    into the bootstrap. Keep is always valid, so the max is always over a non-empty set.
    """
    next_q = target_net(batch.next_states)
    next_q = next_q.masked_fill(~batch.next_valid, -math.inf)
    best = next_q.max(dim=1).values
    best = torch.where(batch.dones > 0, torch.zeros_like(best), best)
    return batch.rewards + gamma * best


def dqn_loss(q_net: nn.Module, target_net: nn.Module, batch: Batch, gamma: float) -> torch.Tensor:
    """Mean squared TD error of the taken actions against ``td_targets``."""
    q_taken = q_net(batch.states).gather(1, batch.actions.view(-1, 1)).squeeze(1)
    return functional.mse_loss(q_taken, td_targets(target_net, batch, gamma))


class DQNTrainer:
    """Adam on a Q-network with a target copy refreshed every ``target_update`` updates.

    ``bc_weight`` > 0 adds the Eq. 9 loss on a teacher batch to every DQN update (BC as a
    regulariser, Goecks et al. 2020); 0 gives plain DQN after the pretraining.
    """

    def __init__(
        self,
        agent: BitWidthAgent,
        *,
        gamma: float = 0.95,
        lr: float = 1e-3,
        batch_size: int = 64,
        target_update: int = 200,
        bc_weight: float = 0.1,
        kl_weight: float = 1.0,
        rng: np.random.Generator | None = None,
    ) -> None:
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        self.agent = agent
        self.q_net = agent.q_net
        self.target_net = copy.deepcopy(agent.q_net)
        self.target_net.requires_grad_(False)
        self.gamma = gamma
        self.batch_size = batch_size
        self.target_update = target_update
        self.bc_weight = bc_weight
        self.kl_weight = kl_weight
        self.optimizer = torch.optim.Adam(self.q_net.parameters(), lr=lr)
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.updates = 0

    def sync_target(self) -> None:
        """Copy the online weights into the target network."""
        self.target_net.load_state_dict(self.q_net.state_dict())

    def _step(self, loss: torch.Tensor) -> float:
        self.q_net.train()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.q_net.eval()
        return float(loss.detach())

    def pretrain_bc(self, teacher: TeacherSamples, steps: int) -> float:
        """Fit Eq. 9 on teacher samples for ``steps`` minibatches; returns the last loss.

        The target network is synced afterwards so DQN bootstraps from the cloned values.
        """
        loss = float("nan")
        for _ in range(steps):
            states, actions, returns, probs = teacher.sample(self.batch_size, self.rng)
            loss = self._step(bc_loss(self.q_net, states, actions, returns, probs, self.kl_weight))
        self.sync_target()
        return loss

    def update(self, replay: ReplayBuffer, teacher: TeacherSamples | None = None) -> float:
        """One DQN step on a replay batch (+ the weighted BC term); returns the loss."""
        self.q_net.train()
        loss = dqn_loss(
            self.q_net, self.target_net, replay.sample(self.batch_size, self.rng), self.gamma
        )
        if teacher is not None and self.bc_weight > 0.0:
            states, actions, returns, probs = teacher.sample(self.batch_size, self.rng)
            loss = loss + self.bc_weight * bc_loss(
                self.q_net, states, actions, returns, probs, self.kl_weight
            )
        value = self._step(loss)
        self.updates += 1
        if self.updates % self.target_update == 0:
            self.sync_target()
        return value


__all__ = [
    "ACTIONS",
    "DEFAULT_AGENT_PATH",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "NUM_ACTIONS",
    "STATE_SIZE",
    "STATE_SPEC",
    "Batch",
    "BitWidthAgent",
    "DQNTrainer",
    "QNetwork",
    "ReplayBuffer",
    "TeacherSamples",
    "Transition",
    "action_kind",
    "apply_action",
    "bc_loss",
    "build_state",
    "discounted_returns",
    "dqn_loss",
    "load_default_agent",
    "masked_argmax",
    "reward",
    "td_targets",
    "valid_actions",
]
