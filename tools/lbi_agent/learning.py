"""How the LBI-FL bit-width agent learns (paper Sections 4.3-4.4): reward, replay, BC, DQN.

Reward (Eqs. 6-8): ``q_idx * a_idx * t`` with q_idx = theta / (1 - lambda), lambda the BitOPs
reduction against full INT8 training (0 at INT8, 0.75 at INT4), and a_idx = 1 when the accuracy
beats the INT8 run's accuracy at the same epoch, 1 / (1 + (a_r - a) * delta) otherwise (accuracies
in percent, so with delta = 0.5 one point of accuracy lost costs as much as a factor 1.5 of q_idx).

Learning: the agent's ``QNetwork`` (``clients.lbi_agent``) is first fitted to teacher episodes
with the behaviour-cloning loss of Eq. 9 (``bc_loss``), then trained by DQN (``dqn_loss``: replay
buffer, periodically copied target network, TD target maximised over the *valid* next actions
only). Following Goecks et al. (2020), which the paper cites for BC "as a regularization",
``DQNTrainer`` can keep the Eq. 9 term on teacher samples, weighted by ``bc_weight``, in every DQN
update, so exploration refines the teacher's schedules instead of forgetting them after a few
noisy episodes.

Returns: Eq. 9 regresses q(s, a) on the Monte-Carlo return of the teacher sample
(``discounted_returns``): the paper's plain sum of rewards with gamma = 1 (the training
command's default ``--bc-gamma``), or discounted with the DQN's gamma so that BC fits the quantity
DQN keeps estimating.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from clients.lbi_agent import NUM_ACTIONS, BitWidthAgent


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
