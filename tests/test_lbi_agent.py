"""LBI-FL bit-width agent: state layout, action masking, Eqs. 6-9, DQN pieces, persistence, and a
tiny end-to-end episode of the agent-training environment."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clients.lbi_agent import (
    ACTIONS,
    DEFAULT_AGENT_PATH,
    NUM_ACTIONS,
    STATE_SIZE,
    STATE_SPEC,
    BitWidthAgent,
    QNetwork,
    apply_action,
    build_state,
    load_default_agent,
    lowbit_code_hash,
    provenance_problem,
    valid_actions,
)
from compression.lowbit import FP32, INT4, INT8, KINDS, BitWidths
from tools.lbi_agent.learning import (
    Batch,
    DQNTrainer,
    ReplayBuffer,
    TeacherSamples,
    Transition,
    bc_loss,
    discounted_returns,
    dqn_loss,
    reward,
    td_targets,
)


class FixedQ(nn.Module):
    """A 'Q-network' that returns given rows, so losses can be checked by hand."""

    def __init__(self, rows: list[list[float]]) -> None:
        super().__init__()
        self.rows = nn.Parameter(torch.tensor(rows, dtype=torch.float32))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.rows[: states.shape[0]]


def random_widths(rng: np.random.Generator) -> BitWidths:
    return BitWidths(*(int(rng.choice([4, 6, 8])) for _ in KINDS))


# --------------------------------------------------------------------------- state / actions
def test_state_layout_exact_values() -> None:
    state = build_state(
        0.35,
        BitWidths(weight=4, activation=6, gradient=8),
        {"weight": 0.125, "activation": 0.25, "gradient": 0.0625},
        {"weight": -1.0, "activation": 0.5, "gradient": 0.2},
    )
    expected = np.array(
        [0.35, 0.5, 0.75, 1.0, 0.125, 0.25, 0.0625, -1.0, 0.5, 0.2], dtype=np.float32
    )
    assert state.dtype == np.float32 and state.shape == (STATE_SIZE,)
    np.testing.assert_array_equal(state, expected)
    assert STATE_SPEC == (
        "time", "bits-w", "bits-a", "bits-g", "loss-w", "loss-a", "loss-g",
        "changed-w", "changed-a", "changed-g",
    )  # fmt: skip


def test_state_defaults_for_missing_entries() -> None:
    state = build_state(0.0, INT4, {}, {})
    np.testing.assert_array_equal(state[4:7], 0.0)
    np.testing.assert_array_equal(state[7:], -1.0)


def test_action_mask() -> None:
    assert ACTIONS == ("keep", "raise-weight", "raise-activation", "raise-gradient")
    assert valid_actions(INT4).tolist() == [True, True, True, True]
    assert valid_actions(BitWidths(8, 6, 8)).tolist() == [True, False, True, False]
    assert valid_actions(BitWidths(6, 8, 4)).tolist() == [True, True, False, True]
    assert valid_actions(INT8).tolist() == [True, False, False, False]
    assert valid_actions(FP32).tolist() == [True, False, False, False]


def test_apply_action_raises_by_two_and_rejects_invalid() -> None:
    assert apply_action(INT4, 0) == INT4
    assert apply_action(INT4, 1) == BitWidths(6, 4, 4)
    assert apply_action(INT4, 2) == BitWidths(4, 6, 4)
    assert apply_action(BitWidths(4, 4, 6), 3) == BitWidths(4, 4, 8)
    for bad in (4, -1, True, 1.0):
        with pytest.raises(ValueError):
            apply_action(INT4, bad)
    with pytest.raises(ValueError, match="invalid"):
        apply_action(BitWidths(8, 4, 4), 1)
    with pytest.raises(ValueError):
        apply_action(INT8, 3)


def test_random_valid_walks_stay_in_range_and_never_go_down() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        widths = INT4
        for _ in range(12):
            action = int(rng.choice(np.flatnonzero(valid_actions(widths))))
            new = apply_action(widths, action)
            for kind in KINDS:
                assert widths.get(kind) <= new.get(kind) <= 8
            assert sum(new.as_tuple()) - sum(widths.as_tuple()) == (0 if action == 0 else 2)
            widths = new
        assert valid_actions(widths)[0]


# --------------------------------------------------------------------------- reward
def test_reward_eqs_6_to_8_hand_values() -> None:
    # a <= a_r: q_idx = 0.25 / (1 - 0.5) = 0.5, a_idx = 1 / (1 + 2 * 0.5) = 0.5, t = 0.8.
    assert reward(90.0, 92.0, 0.5, 0.8) == pytest.approx(0.2)
    # a > a_r: a_idx = 1; lambda 0.75 (all INT4) gives q_idx = 1.
    assert reward(93.0, 92.0, 0.75, 1.0) == pytest.approx(1.0)
    # a == a_r takes the second branch, which is 1 there too; full INT8 (lambda 0) gives 0.25.
    assert reward(92.0, 92.0, 0.0, 0.5) == pytest.approx(0.125)
    # Other theta / delta: q_idx = 0.2 / 0.4 = 0.5, a_idx = 1 / (1 + 4 * 0.25) = 0.5.
    assert reward(80.0, 84.0, 0.6, 0.5, theta=0.2, delta=0.25) == pytest.approx(0.125)
    # Accuracy gap 1 point at delta 0.5: a factor 1 / 1.5.
    assert reward(91.0, 92.0, 0.0, 1.0) == pytest.approx(0.25 / 1.5)
    with pytest.raises(ValueError):
        reward(90.0, 90.0, 1.0, 0.5)


def test_discounted_returns() -> None:
    np.testing.assert_allclose(discounted_returns([1.0, 2.0, 3.0], 0.5), [2.75, 3.5, 3.0])
    np.testing.assert_allclose(discounted_returns([1.0, 2.0, 3.0], 1.0), [6.0, 5.0, 3.0])


# --------------------------------------------------------------------------- networks / losses
def test_q_network_has_paper_size() -> None:
    net = QNetwork()
    assert sum(p.numel() for p in net.parameters()) == 1924 == 10 * 128 + 128 + 128 * 4 + 4
    assert net(torch.zeros(3, STATE_SIZE)).shape == (3, NUM_ACTIONS)


def test_bc_loss_hand_computation_one_hot_and_soft() -> None:
    rows = [[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0]]
    net = FixedQ(rows)
    states = torch.zeros(2, STATE_SIZE)
    actions = torch.tensor([1, 2])
    returns = torch.tensor([1.5, 2.0])
    value = ((1.5 - 2.0) ** 2 + (2.0 - 3.0) ** 2) / 2

    def log_softmax(row: list[float], index: int) -> float:
        return row[index] - math.log(sum(math.exp(v) for v in row))

    kl_one_hot = -(log_softmax(rows[0], 1) + log_softmax(rows[1], 2)) / 2
    loss = bc_loss(net, states, actions, returns)
    assert loss.item() == pytest.approx(value + kl_one_hot, rel=1e-6)
    assert bc_loss(net, states, actions, returns, kl_weight=0.0).item() == pytest.approx(value)

    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.25, 0.75, 0.0]])
    kl_soft = (
        0.5 * (math.log(0.5) - log_softmax(rows[0], 0))
        + 0.5 * (math.log(0.5) - log_softmax(rows[0], 1))
        + 0.25 * (math.log(0.25) - log_softmax(rows[1], 1))
        + 0.75 * (math.log(0.75) - log_softmax(rows[1], 2))
    ) / 2
    loss = bc_loss(net, states, actions, returns, probs, kl_weight=2.0)
    assert loss.item() == pytest.approx(value + 2.0 * kl_soft, rel=1e-6)


def transition(action: int, reward_value: float, done: bool, next_valid: list[bool]) -> Transition:
    return Transition(
        np.full(STATE_SIZE, 0.1, dtype=np.float32),
        action,
        reward_value,
        np.full(STATE_SIZE, 0.2, dtype=np.float32),
        done,
        np.asarray(next_valid),
    )


def test_td_target_masks_invalid_next_actions_and_stops_at_episode_end() -> None:
    target = FixedQ([[1.0, 9.0, 2.0, 0.5], [1.0, 9.0, 2.0, 0.5]])
    batch = Batch.of(
        [
            transition(0, 0.3, False, [True, False, True, True]),  # the 9.0 action is invalid
            transition(2, 0.7, True, [True, True, True, True]),
        ]
    )
    np.testing.assert_allclose(td_targets(target, batch, 0.9).numpy(), [0.3 + 0.9 * 2.0, 0.7])


def test_dqn_update_moves_q_toward_td_target() -> None:
    torch.manual_seed(0)
    agent = BitWidthAgent(QNetwork())
    trainer = DQNTrainer(agent, gamma=0.9, lr=1e-2, batch_size=8, target_update=10**6)
    replay = ReplayBuffer(4)
    item = transition(3, 1.0, False, [True, True, False, True])
    replay.add(item)
    batch = Batch.of([item])
    target_before = td_targets(trainer.target_net, batch, 0.9)
    gap_before = dqn_loss(agent.q_net, trainer.target_net, batch, 0.9).item()
    q_before = agent.q_values(item.state)[3]
    trainer.update(replay)
    gap_after = dqn_loss(agent.q_net, trainer.target_net, batch, 0.9).item()
    q_after = agent.q_values(item.state)[3]
    assert gap_after < gap_before
    assert abs(q_after - float(target_before[0])) < abs(q_before - float(target_before[0]))
    # The target network did not move (no sync yet).
    torch.testing.assert_close(td_targets(trainer.target_net, batch, 0.9), target_before)
    trainer.sync_target()
    for online, frozen in zip(
        agent.q_net.parameters(), trainer.target_net.parameters(), strict=True
    ):
        torch.testing.assert_close(online, frozen)


def test_bc_pretraining_makes_teacher_action_greedy() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    episodes = []
    for _ in range(4):
        steps = []
        for k in range(6):
            state = np.zeros(STATE_SIZE, dtype=np.float32)
            state[0] = k / 6
            # teacher: raise gradients at the first two decisions, keep afterwards
            steps.append(
                Transition(state, 3 if k < 2 else 0, 0.1 * k, state, k == 5, np.ones(4, bool))
            )
        episodes.append(steps)
    teacher = TeacherSamples.from_episodes(episodes, gamma=0.9)
    assert len(teacher) == 24 and teacher.probs.sum(axis=1).tolist() == [1.0] * 24
    np.testing.assert_allclose(
        teacher.returns[:6], discounted_returns([0.1 * k for k in range(6)], 0.9)
    )
    agent = BitWidthAgent(QNetwork())
    DQNTrainer(agent, batch_size=16, rng=rng).pretrain_bc(teacher, 400)
    for k in range(6):
        assert agent.act(teacher.states[k], INT4) == (3 if k < 2 else 0)


def test_replay_buffer_is_a_ring() -> None:
    replay = ReplayBuffer(3)
    for index in range(5):
        replay.add(transition(0, float(index), False, [True] * 4))
    assert len(replay) == 3
    rewards = set(replay.sample(64, np.random.default_rng(0)).rewards.tolist())
    assert rewards == {2.0, 3.0, 4.0}


# --------------------------------------------------------------------------- agent / files
def test_act_never_picks_a_masked_action() -> None:
    net = FixedQ([[0.0, 5.0, 1.0, 4.0]])
    agent = BitWidthAgent(net)  # type: ignore[arg-type]
    state = np.zeros(STATE_SIZE, dtype=np.float32)
    assert agent.act(state, INT4) == 1
    assert agent.act(state, BitWidths(8, 4, 4)) == 3
    assert agent.act(state, BitWidths(8, 4, 8)) == 2
    assert agent.act(state, INT8) == 0
    rng = np.random.default_rng(0)
    drawn = {agent.act(state, BitWidths(8, 4, 8), epsilon=1.0, rng=rng) for _ in range(200)}
    assert drawn == {0, 2}


def test_save_load_round_trip_is_exact(tmp_path) -> None:
    torch.manual_seed(3)
    agent = BitWidthAgent(QNetwork(), {"seed": 7, "command": "x", "nested": {"a": [1, 2]}})
    path = tmp_path / "agent.json"
    agent.save(path)
    loaded = BitWidthAgent.load(path)
    assert loaded.metadata == agent.metadata
    for key, tensor in agent.q_net.state_dict().items():
        assert torch.equal(loaded.q_net.state_dict()[key], tensor)
    state = np.random.default_rng(0).normal(size=STATE_SIZE).astype(np.float32)
    np.testing.assert_array_equal(loaded.q_values(state), agent.q_values(state))


def test_load_rejects_another_layout(tmp_path) -> None:
    payload = BitWidthAgent(QNetwork()).to_json()
    payload["state_spec"] = list(reversed(payload["state_spec"]))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="state layout"):
        BitWidthAgent.load(path)
    path.write_text(json.dumps({**BitWidthAgent(QNetwork()).to_json(), "version": 99}))
    with pytest.raises(ValueError):
        BitWidthAgent.load(path)


def test_shipped_agent_loads_and_acts_validly() -> None:
    assert DEFAULT_AGENT_PATH.name == "lbi_agent.json"
    agent = load_default_agent()
    for key in ("command", "seed", "version", "state_spec", "training"):
        assert key in agent.metadata
    rng = np.random.default_rng(0)
    for _ in range(300):
        widths = random_widths(rng)
        losses = dict(zip(KINDS, rng.uniform(0, 0.3, size=3), strict=True))
        changed = dict(zip(KINDS, rng.choice([-1.0, 0.2, 0.5], size=3), strict=True))
        state = build_state(float(rng.uniform()), widths, losses, changed)
        action = agent.act(state, widths)
        assert valid_actions(widths)[action]
        apply_action(widths, action)


@pytest.mark.parametrize("path", sorted(DEFAULT_AGENT_PATH.parent.glob("lbi_agent*.json")))
def test_every_shipped_agent_was_trained_on_todays_low_bit_code(path: Path) -> None:
    """A change to compression/lowbit.py makes every shipped agent stale until it is retrained
    (README: LBI-FL agent); this fails on that change, not months later."""
    agent = BitWidthAgent.load(path)
    assert agent.metadata["lowbit_sha256"] == lowbit_code_hash()
    assert provenance_problem(agent) is None


def test_a_stale_agent_is_named_and_warned_about_at_load(tmp_path, caplog) -> None:
    from clients import lbi

    payload = json.loads(DEFAULT_AGENT_PATH.read_text())
    payload["metadata"]["lowbit_sha256"] = "45a8b4be" + "0" * 56  # planted: another lowbit.py
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps(payload))
    problem = provenance_problem(BitWidthAgent.load(stale))
    assert problem is not None and "45a8b4be" in problem and lowbit_code_hash()[:8] in problem
    del payload["metadata"]["lowbit_sha256"]
    assert "no lowbit_sha256" in str(provenance_problem(BitWidthAgent.from_json(payload)))
    import logging

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(caplog.handler)
    try:
        lbi.load_agent(str(stale))
    finally:
        flwr_logger.removeHandler(caplog.handler)
    assert any("stale" in r.getMessage() and "45a8b4be" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- environment
def test_teacher_schedule_follows_section_4_4_ranges() -> None:
    from tools.lbi_agent.environment import EnvConfig, teacher_schedule

    times = EnvConfig().decision_times
    assert times[0] == pytest.approx(0.10) and times[-1] == pytest.approx(0.95)
    rng = np.random.default_rng(0)
    weight_kept = 0
    for _ in range(200):
        plan = teacher_schedule(times, rng)
        by_kind: dict[int, list[float]] = {}
        for index in sorted(plan):
            by_kind.setdefault(plan[index], []).append(times[index])
        # Both raises of a kind, and so the time it reaches INT8, fall inside its range.
        assert len(by_kind[3]) == 2 and 0.10 - 1e-9 <= min(by_kind[3])
        assert max(by_kind[3]) <= 0.45 + 1e-9
        assert len(by_kind[2]) == 2 and 0.50 - 1e-9 <= min(by_kind[2])
        assert max(by_kind[2]) <= 0.90 + 1e-9
        assert by_kind[3][1] < by_kind[2][0]  # gradients reach INT8 before activations move
        if 1 in by_kind:
            assert len(by_kind[1]) == 2 and 0.50 - 1e-9 <= min(by_kind[1])
            assert max(by_kind[1]) <= 0.95 + 1e-9
        else:
            weight_kept += 1
        widths = INT4
        for index in range(len(times)):
            widths = apply_action(widths, plan.get(index, 0))
        assert widths.gradient == 8 and widths.activation == 8
    assert 60 < weight_kept < 140


def test_tiny_environment_episode_end_to_end_and_cache_is_exact() -> None:
    from tools.lbi_agent.environment import (
        BitWidthEnv,
        EnvConfig,
        load_env_data,
        plan_policy,
        run_episode,
    )

    torch.set_num_threads(1)
    cfg = EnvConfig(train_fraction=0.1, epochs=4, start=1, interval=1, batch_size=32)
    train, heldout = load_env_data(cfg.train_fraction, cfg.seed)
    small = (train, torch.utils.data.TensorDataset(*(t[:200] for t in heldout.tensors)))
    env = BitWidthEnv(cfg, small)
    plan = {0: 3, 1: 3, 2: 2}
    first = run_episode(env, plan_policy(plan))
    assert env.reference is not None and len(env.reference.accuracy) == cfg.epochs + 1
    assert [t.action for t in first.transitions] == [3, 3, 2]
    assert first.widths == BitWidths(4, 6, 8)
    assert [t.done for t in first.transitions] == [False, False, True]
    # lambda: BitOPs per MAC w*a + g*w + g*a: epoch 1 at INT4 48, 2 at (4,4,6) 64, 3 at (4,4,8)
    # 80, 4 at (4,6,8) 104, against 192 for INT8.
    assert first.compression_ratio == pytest.approx(1 - (48 + 64 + 80 + 104) / (4 * 192))
    last = first.transitions[-1]
    assert last.reward == pytest.approx(
        reward(first.accuracy, env.reference.accuracy[4], first.compression_ratio, 1.0)
    )
    assert last.next_state[0] == pytest.approx(1.0)
    np.testing.assert_allclose(last.next_state[7:], [-1.0, 0.75, 0.5])
    trained = env.trained_epochs
    again = run_episode(env, plan_policy(plan))
    assert env.trained_epochs == trained  # replayed from the cache
    fresh = BitWidthEnv(cfg, small)  # no cache: trains everything again
    third = run_episode(fresh, plan_policy(plan))
    for episode in (again, third):
        assert episode.accuracy == first.accuracy
        assert [t.reward for t in episode.transitions] == [t.reward for t in first.transitions]
        for a, b in zip(episode.transitions, first.transitions, strict=True):
            np.testing.assert_array_equal(a.state, b.state)


def test_policy_selection_needs_evidence_against_the_bc_agent() -> None:
    from tools.lbi_agent.train import select_policy

    bc = {"after": 0, "returns": [5.0, 4.0, 6.0], "score": 5.0}
    noisy = {"after": 8, "returns": [8.0, 1.0, 7.5], "score": 5.5}  # +3, -3, +1.5: within noise
    steady = {"after": 16, "returns": [5.6, 4.5, 6.7], "score": 5.6}  # +0.6, +0.5, +0.7
    assert select_policy([bc, noisy])["after"] == 0
    assert select_policy([bc, noisy, steady])["after"] == 16
    worse = {"after": 24, "returns": [4.0, 3.0, 5.0], "score": 4.0}
    assert select_policy([bc, worse])["after"] == 0


def test_the_eq9_target_is_the_plain_sum_of_rewards_by_default() -> None:
    """The paper regresses q(s, a) on the sum of the episode's remaining rewards (Eq. 9); the
    training command's ``--bc-gamma`` defaults to 1, the DQN target keeps its own gamma."""
    from tools.lbi_agent.train import parse_args

    args = parse_args([])
    assert args.bc_gamma == 1.0 and args.gamma == 0.95
    state = np.zeros(STATE_SIZE, np.float32)
    rewards = [0.5, 0.25, 1.0]
    episode = [
        Transition(state, 0, r, state, i == 2, np.ones(NUM_ACTIONS, bool))
        for i, r in enumerate(rewards)
    ]
    samples = TeacherSamples.from_episodes([episode], args.bc_gamma)
    np.testing.assert_allclose(samples.returns, [1.75, 1.25, 1.0])


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="no Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist)",
)
def test_the_environment_trains_on_another_dataset() -> None:
    """``--dataset fmnist``: 28x28 single-channel input, held-out images from the train split."""
    from tools.lbi_agent.environment import BitWidthEnv, EnvConfig, plan_policy, run_episode

    torch.set_num_threads(1)
    cfg = EnvConfig(
        dataset="fmnist", model="lenet5", train_fraction=0.005, heldout_size=100, epochs=2, start=1
    )
    env = BitWidthEnv(cfg)
    assert env.input_shape == (1, 28, 28)
    assert len(env.train_set) == 300 and len(env.heldout) == 100
    assert tuple(env.train_set.tensors[0].shape[1:]) == (1, 28, 28)
    episode = run_episode(env, plan_policy({0: 3}))
    assert episode.widths.gradient == 6 and 0.0 <= episode.accuracy <= 100.0


def test_the_wire_option_leaves_weights_on_the_weight_grid_after_every_epoch() -> None:
    """``wire=True``: like LBI-FL's downlink each round, every Conv2d/Linear weight ends each
    epoch on the k_w-bit grid of its output channel (at most 2^k - 1 values), stochastically
    rounded (so not the nearest-rounded weights)."""
    from tools.lbi_agent.environment import BitWidthEnv, EnvConfig, load_env_data

    torch.set_num_threads(1)
    cfg = EnvConfig(train_fraction=0.1, epochs=2, start=1, wire=True)
    train, heldout = load_env_data(cfg.train_fraction, cfg.seed)
    held = torch.utils.data.TensorDataset(*(t[:100] for t in heldout.tensors))
    env = BitWidthEnv(cfg, (train, held))
    env.reset()
    weights = [p.detach() for p in env._current.model.parameters() if p.dim() >= 2]
    assert weights
    for weight in weights:
        for channel in weight.reshape(weight.shape[0], -1):
            assert torch.unique(channel).numel() <= 2**4 - 1


def test_teacher_can_raise_weights_in_an_earlier_range() -> None:
    """``weight_range``: the teacher's weight raises (both of them) fall inside the given range,
    after the gradients took theirs; gradients and activations keep the paper's ranges."""
    from tools.lbi_agent.environment import EnvConfig, teacher_schedule

    times = EnvConfig().decision_times
    rng = np.random.default_rng(3)
    for _ in range(100):
        plan = teacher_schedule(times, rng, weight_keep_prob=0.0, weight_range=(0.10, 0.45))
        by_kind: dict[int, list[float]] = {}
        for index in sorted(plan):
            by_kind.setdefault(plan[index], []).append(times[index])
        assert len(by_kind[1]) == 2 and 0.10 - 1e-9 <= min(by_kind[1])
        assert max(by_kind[1]) <= 0.45 + 1e-9
        assert len(by_kind[3]) == 2 and max(by_kind[3]) <= 0.45 + 1e-9
        assert len(by_kind[2]) == 2 and min(by_kind[2]) >= 0.50 - 1e-9


def test_wire_every_rounds_weights_within_the_epoch_and_stays_deterministic() -> None:
    """``wire_every=N``: the weights also cross the wire every N steps. It changes training
    (not the same model as once per epoch), keeps the weights on the grid, and two
    environments with the same config train the same model."""
    from tools.lbi_agent.environment import BitWidthEnv, EnvConfig, load_env_data

    torch.set_num_threads(1)
    base = EnvConfig(train_fraction=0.1, epochs=2, start=1, wire=True)
    train, heldout = load_env_data(base.train_fraction, base.seed)
    held = torch.utils.data.TensorDataset(*(t[:100] for t in heldout.tensors))

    def trained(cfg: EnvConfig) -> list[torch.Tensor]:
        env = BitWidthEnv(cfg, (train, held))
        env.reset()
        return [p.detach().clone() for p in env._current.model.parameters()]

    every = EnvConfig(train_fraction=0.1, epochs=2, start=1, wire=True, wire_every=2)
    first, again, per_epoch = trained(every), trained(every), trained(base)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, per_epoch, strict=True))
    for weight in (p for p in first if p.dim() >= 2):
        for channel in weight.reshape(weight.shape[0], -1):
            assert torch.unique(channel).numel() <= 2**4 - 1
    with pytest.raises(ValueError, match="wire_every"):
        EnvConfig(wire_every=-1)


def test_teacher_keep_probabilities_skip_gradient_and_activation_raises() -> None:
    """Keep probabilities of 1 leave gradients/activations at INT4; 0 (the default) draws
    nothing, so the paper teacher's stream of samples is unchanged; 0.5 mixes both."""
    from tools.lbi_agent.environment import EnvConfig, teacher_schedule

    times = EnvConfig().decision_times
    paper = [teacher_schedule(times, np.random.default_rng(9)) for _ in range(1)]
    explicit = [teacher_schedule(times, np.random.default_rng(9), 0.5, (0.50, 0.95), 0.0, 0.0)]
    assert paper == explicit
    rng = np.random.default_rng(1)
    for _ in range(50):
        plan = teacher_schedule(times, rng, 1.0, gradient_keep_prob=1.0, activation_keep_prob=1.0)
        assert plan == {}
    kinds = [
        set(teacher_schedule(times, rng, 1.0, (0.5, 0.95), 0.5, 0.5).values()) for _ in range(200)
    ]
    assert 60 < sum(3 in k for k in kinds) < 140 and 60 < sum(2 in k for k in kinds) < 140


def test_compare_runs_every_schedule_from_the_same_start(tmp_path) -> None:
    """tools.lbi_agent.compare on a tiny environment: every schedule is there, UI8 costs 1.0 of
    UI8's BitOPs, UI4 0.25, FP32 16, the agent's figures are its episode's, and the JSON holds
    the table."""
    from clients.lbi_agent import load_default_agent
    from tools.lbi_agent import compare

    torch.set_num_threads(1)
    out = tmp_path / "compare.json"
    flags = ["--train-fraction", "0.1", "--heldout-size", "100", "--epochs", "3", "--start", "1"]
    agent_file = tmp_path / "agent.json"
    load_default_agent().save(agent_file)
    assert (
        compare.main(["--agent", str(agent_file), "--seeds", "5", "--json", str(out), *flags]) == 0
    )
    payload = json.loads(out.read_text())
    rows = payload["results"][0]["rows"]
    assert list(rows) == ["fp32", "ui8", "ui4", "random", "random-matched", "agent"]
    assert rows["ui8"]["bitops_vs_int8"] == 1.0 and rows["fp32"]["bitops_vs_int8"] == 16.0
    assert rows["ui4"]["bitops_vs_int8"] == pytest.approx(0.25)
    assert all(0.0 <= row["accuracy"] <= 100.0 for row in rows.values())
    assert "| agent |" in payload["table"]


@pytest.mark.parametrize(
    "losses",
    [
        {"weight": 0.126, "activation": 0.0122, "gradient": 0.0041},  # a federated client's
        {"weight": 0.05, "activation": 0.02, "gradient": 0.01},
        {"weight": 0.2, "activation": 0.005, "gradient": 0.002},
    ],
)
def test_the_fmnist_agent_raises_weights_early_and_never_gradients(losses) -> None:
    """The shipped Fashion-MNIST agent, rolled out over the 18 decisions of its environment as
    a client would (widths and change times updated after each action): the weights reach
    INT8 by t = 0.25, the gradients stay at INT4 (what its training found pays under Eqs. 6-8)."""
    from clients.lbi_agent import BitWidthAgent, build_state

    agent = BitWidthAgent.load("clients/lbi_agent_fmnist.json")
    assert "--wire" in agent.metadata["command"] and "fmnist" in agent.metadata["command"]
    widths, last_change, weight_at_8 = (
        INT4,
        dict.fromkeys(("weight", "activation", "gradient"), -1.0),
        None,
    )
    for index in range(2, 20):
        time_step = index / 20
        action = agent.act(build_state(time_step, widths, losses, last_change), widths)
        new = apply_action(widths, action)
        for kind in last_change:
            if new.get(kind) != widths.get(kind):
                last_change[kind] = time_step
        widths = new
        if widths.weight == 8 and weight_at_8 is None:
            weight_at_8 = time_step
    assert weight_at_8 is not None and weight_at_8 <= 0.25
    assert widths.gradient == 4
