"""Train the LBI-FL bit-width agent (paper Sections 4.3-4.4, 5.1) and write it as JSON.

    python -m tools.lbi_agent.train --out clients/lbi_agent.json \\
        --log benchmarks/results/lbi-agent/train.jsonl --seed 0 [--dqn-episodes 48 ...]

The environment is ``tools.lbi_agent.environment`` (central low-bit training of a small model on
part of the digits train split; the digits test split is never touched), the learning pieces
``tools.lbi_agent.learning``. Because one seed's training run is a single noisy draw, episodes
rotate over ``--env-seeds`` environments (other initial weights, data subset and batch order),
each with its own INT8 reference, so the agent does not learn one run's quirks.

Phases of ``main``: (a) ``build_environments``: one environment and its INT8 reference run per
training seed; (b) ``collect_teacher``: teacher episodes (``teacher_schedule``, Section 4.4);
(c) ``pretrain``: behaviour-cloning of the Q-network on them (Eq. 9); (d) ``run_dqn``: DQN
episodes with epsilon-greedy exploration (epsilon decays linearly), a replay buffer that also
holds the teacher transitions, a periodically synced target network, and the Eq. 9 term kept as
a weighted regulariser (Goecks et al. 2020); (e) ``select_policy``: the BC agent and the agent
every ``--select-every`` DQN episodes are scored greedily on the training environments, and the
BC agent ships unless a DQN candidate beats it by more than one standard error (on digits it
does not: INT4 and INT8 end within SGD noise of each other, so no raise pays for its BitOPs under
Eqs. 6-8); (f) ``evaluate_fresh``: the shipped agent runs greedily on a *fresh* environment (a
seed not trained on) next to INT8, INT4, teacher and random schedules; the table is printed and
stored in the agent's metadata with the command and provenance. One JSON line per episode goes to
``--log``.

Everything is seeded from ``--seed``; on CPU with one thread (``--threads 1``, the default) two runs
with the same arguments write the same agent weights.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.lbi_agent import (
    DEFAULT_AGENT_PATH,
    FORMAT_VERSION,
    STATE_SPEC,
    BitWidthAgent,
    QNetwork,
    lowbit_code_hash,
)
from compression.lowbit import INT8
from core.seeding import derive_seed
from tools.lbi_agent.environment import (
    WEIGHT_RANGE,
    BitWidthEnv,
    EnvConfig,
    Episode,
    agent_policy,
    matched_random_plan,
    plan_policy,
    run_episode,
    teacher_schedule,
    uniform_random_policy,
)
from tools.lbi_agent.learning import DQNTrainer, ReplayBuffer, TeacherSamples

#: salts separating the seed streams of the phases.
_TEACHER_SALT = 0x7EA
_DQN_SALT = 0xD01
_EVAL_SALT = 0xE7A


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tools.lbi_agent.train", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, default=DEFAULT_AGENT_PATH, help="agent JSON to write")
    p.add_argument("--log", type=Path, default=None, help="JSON lines, one per episode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--dataset", default=EnvConfig.dataset, help="environment data (train split)")
    p.add_argument("--model", default=EnvConfig.model)
    p.add_argument("--train-fraction", type=float, default=EnvConfig.train_fraction)
    p.add_argument("--heldout-size", type=int, default=EnvConfig.heldout_size)
    p.add_argument("--epochs", type=int, default=EnvConfig.epochs, help="E, epochs per episode")
    p.add_argument("--start", type=int, default=EnvConfig.start, help="S, first decision epoch")
    p.add_argument("--interval", type=int, default=EnvConfig.interval, help="I, epochs/decision")
    p.add_argument("--batch-size", type=int, default=EnvConfig.batch_size)
    p.add_argument("--lr", type=float, default=EnvConfig.lr)
    p.add_argument("--momentum", type=float, default=EnvConfig.momentum)
    p.add_argument("--layers", default=EnvConfig.layers)
    p.add_argument("--refresh-interval", type=int, default=EnvConfig.refresh_interval)
    p.add_argument("--theta", type=float, default=EnvConfig.theta)
    p.add_argument("--delta", type=float, default=EnvConfig.delta)
    p.add_argument("--cache-size", type=int, default=EnvConfig.cache_size)
    p.add_argument(
        "--wire",
        action="store_true",
        help="round weights to the k_w-bit grid after every epoch (the federated round trip)",
    )
    p.add_argument(
        "--wire-every",
        type=int,
        default=EnvConfig.wire_every,
        help="with --wire: also round every N optimizer steps (a federated local round's length)",
    )
    p.add_argument(
        "--teacher-weight-range",
        type=float,
        nargs=2,
        default=list(WEIGHT_RANGE),
        metavar=("LOW", "HIGH"),
        help="time range in which the teacher raises weights (paper: 0.50 0.95)",
    )
    p.add_argument(
        "--teacher-gradient-keep-prob",
        type=float,
        default=0.0,
        help="probability the teacher keeps gradients at INT4 (paper: 0, always raised)",
    )
    p.add_argument(
        "--teacher-activation-keep-prob",
        type=float,
        default=0.0,
        help="probability the teacher keeps activations at INT4 (paper: 0, always raised)",
    )
    p.add_argument(
        "--env-seeds", type=int, default=3, help="training environments (init/data seeds)"
    )
    p.add_argument("--teacher-episodes", type=int, default=24)
    p.add_argument("--weight-keep-prob", type=float, default=0.5)
    p.add_argument("--dqn-episodes", type=int, default=48)
    p.add_argument("--gamma", type=float, default=0.95, help="discount of the DQN target")
    p.add_argument(
        "--bc-gamma",
        type=float,
        default=1.0,
        help="discount of the Eq. 9 return (1: the paper's plain sum of rewards)",
    )
    p.add_argument("--agent-lr", type=float, default=1e-3)
    p.add_argument("--agent-batch", type=int, default=64)
    p.add_argument("--bc-steps", type=int, default=2000)
    p.add_argument("--bc-weight", type=float, default=0.1, help="Eq. 9 weight during DQN")
    p.add_argument("--kl-weight", type=float, default=1.0, help="KL term weight in Eq. 9")
    p.add_argument("--updates-per-episode", type=int, default=100)
    p.add_argument("--target-update", type=int, default=200)
    p.add_argument("--replay-capacity", type=int, default=20000)
    p.add_argument("--epsilon-start", type=float, default=0.3)
    p.add_argument("--epsilon-end", type=float, default=0.02)
    p.add_argument(
        "--select-every",
        type=int,
        default=8,
        help="greedy check on the training envs every N DQN episodes; ship the best (0: last)",
    )
    p.add_argument("--eval-seed", type=int, default=None, help="fresh env seed (seed + 1000)")
    p.add_argument("--eval-repeats", type=int, default=3, help="teacher/random eval episodes")
    return p.parse_args(argv)


def env_config(args: argparse.Namespace, seed: int) -> EnvConfig:
    return EnvConfig(
        dataset=args.dataset,
        model=args.model,
        train_fraction=args.train_fraction,
        heldout_size=args.heldout_size,
        epochs=args.epochs,
        start=args.start,
        interval=args.interval,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        layers=args.layers,
        refresh_interval=args.refresh_interval,
        theta=args.theta,
        delta=args.delta,
        seed=seed,
        cache_size=args.cache_size,
        wire=args.wire,
        wire_every=args.wire_every,
    )


class _Log:
    """Episode log: JSON lines to ``path`` (if any) and a short line on stdout."""

    def __init__(self, path: Path | None) -> None:
        self.handle = path.open("w", encoding="utf-8") if path else None

    def write(self, record: dict[str, Any]) -> None:
        if self.handle:
            self.handle.write(json.dumps(record, separators=(",", ":")) + "\n")
            self.handle.flush()
        schedule = " ".join(
            f"{t:.2f}:{name.removeprefix('raise-')[0]}" for t, name in record.get("schedule", [])
        )
        print(
            f"{record['kind']:>14} #{record.get('episode', '-')!s:>3} "
            f"acc {record['accuracy']:6.2f} (ref {record['reference_accuracy']:6.2f}) "
            f"RR {record['rr']:5.1f}% return {record['return']:.4f} [{schedule}]",
            flush=True,
        )

    def close(self) -> None:
        if self.handle:
            self.handle.close()


@dataclass
class Training:
    """What the phases of one training command share."""

    args: argparse.Namespace
    envs: list[BitWidthEnv]
    log: _Log
    #: episodes played so far (teacher and DQN); picks the next environment in rotation.
    episodes: itertools.count = field(default_factory=lambda: itertools.count(1))
    checks: list[dict[str, Any]] = field(default_factory=list)

    def next_episode(self) -> tuple[int, BitWidthEnv]:
        number = next(self.episodes)
        return number, self.envs[(number - 1) % len(self.envs)]


def build_environments(args: argparse.Namespace, log: _Log) -> list[BitWidthEnv]:
    """(a) One environment per training seed, each with its INT8 reference run."""
    envs = [
        BitWidthEnv(env_config(args, derive_seed(args.seed, index)))
        for index in range(args.env_seeds)
    ]
    for env in envs:
        env.run_reference()
        log.write(_reference_record(env))
    return envs


def teacher_plan(
    args: argparse.Namespace, times: Sequence[float], rng: np.random.Generator
) -> dict[int, int]:
    """A teacher sample (``teacher_schedule``) with the command's teacher settings."""
    return teacher_schedule(
        times,
        rng,
        args.weight_keep_prob,
        tuple(args.teacher_weight_range),
        args.teacher_gradient_keep_prob,
        args.teacher_activation_keep_prob,
    )


def collect_teacher(training: Training) -> list[Episode]:
    """(b) Teacher episodes of Section 4.4, one per environment in rotation."""
    args = training.args
    rng = np.random.default_rng([args.seed, _TEACHER_SALT])
    episodes = []
    for _ in range(args.teacher_episodes):
        number, env = training.next_episode()
        plan = teacher_plan(args, env.cfg.decision_times, rng)
        episode = run_episode(env, plan_policy(plan))
        episodes.append(episode)
        training.log.write(episode.log_record(kind="teacher", episode=number))
    return episodes


def pretrain(
    args: argparse.Namespace, teacher: TeacherSamples
) -> tuple[BitWidthAgent, DQNTrainer, float]:
    """(c) A fresh Q-network fitted to the teacher samples by Eq. 9; returns the agent, its
    trainer (whose DQN steps come next) and the last BC loss."""
    torch.manual_seed(derive_seed(args.seed, _DQN_SALT))
    agent = BitWidthAgent(QNetwork())
    trainer = DQNTrainer(
        agent,
        gamma=args.gamma,
        lr=args.agent_lr,
        batch_size=args.agent_batch,
        target_update=args.target_update,
        bc_weight=args.bc_weight,
        kl_weight=args.kl_weight,
        rng=np.random.default_rng([args.seed, _DQN_SALT]),
    )
    return agent, trainer, trainer.pretrain_bc(teacher, args.bc_steps)


def greedy_check(training: Training, agent: BitWidthAgent, after: int) -> None:
    """Score the agent greedily on every training environment (cheap: mostly replayed from the
    caches) and keep its weights as a candidate for ``select_policy``."""
    episodes = [run_episode(env, agent_policy(agent)) for env in training.envs]
    records = []
    for env, episode in zip(training.envs, episodes, strict=True):
        training.log.write(
            episode.log_record(kind="greedy-check", after=after, env_seed=env.cfg.seed)
        )
        records.append(episode.log_record(env_seed=env.cfg.seed))
    training.checks.append(
        {
            "after": after,
            "returns": [e.total_reward for e in episodes],
            "score": float(np.mean([e.total_reward for e in episodes])),
            "weights": copy.deepcopy(agent.q_net.state_dict()),
            "records": records,
        }
    )


def run_dqn(
    training: Training,
    agent: BitWidthAgent,
    trainer: DQNTrainer,
    replay: ReplayBuffer,
    teacher: TeacherSamples,
) -> float:
    """(d) DQN episodes with decaying epsilon, greedy checks every ``--select-every`` episodes;
    returns the last DQN loss."""
    args = training.args
    last_loss = float("nan")
    for index in range(args.dqn_episodes):
        number, env = training.next_episode()
        fraction = index / max(args.dqn_episodes - 1, 1)
        epsilon = args.epsilon_start + (args.epsilon_end - args.epsilon_start) * fraction
        episode = run_episode(env, agent_policy(agent, epsilon, trainer.rng))
        for transition in episode.transitions:
            replay.add(transition)
        for _ in range(args.updates_per_episode):
            last_loss = trainer.update(replay, teacher)
        training.log.write(
            episode.log_record(
                kind="dqn", episode=number, epsilon=round(epsilon, 4), loss=round(last_loss, 6)
            )
        )
        done = index + 1
        if done == args.dqn_episodes or (args.select_every and done % args.select_every == 0):
            greedy_check(training, agent, done)
    return last_loss


def evaluate_fresh(
    agent: BitWidthAgent, args: argparse.Namespace, log: _Log, seed: int
) -> dict[str, Any]:
    """Greedy agent vs INT8 / INT4 / teacher / random schedules on an environment never trained
    on; returns {name: {accuracy, rr, return, ...}} (teacher and random: means over repeats)."""
    env = BitWidthEnv(env_config(args, seed))
    reference = env.run_reference()
    decisions = len(env.cfg.decision_epochs)
    rng = np.random.default_rng([args.seed, _EVAL_SALT])
    results: dict[str, Any] = {
        "env_seed": seed,
        "int8": {"accuracy": reference.accuracy[-1], "rr": 0.0},
    }

    def record(name: str, episodes: list[Episode]) -> None:
        for episode in episodes:
            log.write(episode.log_record(kind=f"eval-{name}"))
        results[name] = {
            "accuracy": float(np.mean([e.accuracy for e in episodes])),
            "rr": float(np.mean([100.0 * e.compression_ratio for e in episodes])),
            "return": float(np.mean([e.total_reward for e in episodes])),
            "episodes": len(episodes),
        }
        if len(episodes) == 1:
            results[name]["schedule"] = [[round(t, 4), a] for t, a in episodes[0].schedule]
            results[name]["widths"] = list(episodes[0].widths.as_tuple())

    greedy = run_episode(env, agent_policy(agent))
    record("agent", [greedy])
    record("int4", [run_episode(env, plan_policy({}))])
    record(
        "teacher",
        [
            run_episode(
                env,
                plan_policy(teacher_plan(args, env.cfg.decision_times, rng)),
            )
            for _ in range(args.eval_repeats)
        ],
    )
    record(
        "random",
        [run_episode(env, uniform_random_policy(rng)) for _ in range(args.eval_repeats)],
    )
    raises = [t.action for t in greedy.transitions if t.action]
    if raises:
        record(
            "random-matched",
            [
                run_episode(env, plan_policy(matched_random_plan(raises, decisions, rng)))
                for _ in range(args.eval_repeats)
            ],
        )
    return results


def select_policy(checks: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The check to ship: the best mean greedy return, if it beats the behaviour-cloned agent
    (``checks[0]``) by more than one standard error of their paired per-environment difference;
    otherwise the behaviour-cloned agent.

    Why: with a handful of noisy episodes the DQN iterate wanders, and on an environment where
    schedules barely differ (digits: INT4 and INT8 end within SGD noise of each other) the top
    mean return among several candidates is mostly selection noise. The BC agent, which encodes
    the teacher's prior, is kept unless the environments give evidence against it.
    """
    base = np.asarray(checks[0]["returns"], dtype=np.float64)
    best = max(checks, key=lambda c: c["score"])
    diff = np.asarray(best["returns"], dtype=np.float64) - base
    if diff.size < 2:
        return best if diff.mean() > 0 else checks[0]
    stderr = diff.std(ddof=1) / np.sqrt(diff.size)
    return best if diff.mean() > stderr else checks[0]


def _reference_record(env: BitWidthEnv) -> dict[str, Any]:
    assert env.reference is not None
    accuracy = env.reference.accuracy
    return {
        "kind": "reference",
        "env_seed": env.cfg.seed,
        "widths": list(INT8.as_tuple()),
        "accuracy": round(accuracy[-1], 3),
        "reference_accuracy": round(accuracy[-1], 3),
        "rr": 0.0,
        "return": 0.0,
        "accuracy_per_epoch": [round(a, 2) for a in accuracy[1:]],
    }


def _summary_table(evaluation: dict[str, Any]) -> str:
    lines = [f"fresh environment (seed {evaluation['env_seed']}):"]
    for name, row in evaluation.items():
        if not isinstance(row, dict):
            continue
        schedule = " ".join(
            f"{t:.2f}:{a.removeprefix('raise-')}" for t, a in row.get("schedule", [])
        )
        episodes = f" (mean of {row['episodes']})" if row.get("episodes", 1) > 1 else ""
        lines.append(
            f"  {name:<15} acc {row['accuracy']:6.2f}%  BitOPs RR vs INT8 {row['rr']:5.1f}%"
            f"{episodes} {schedule}"
        )
    return "\n".join(lines)


def agent_metadata(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    training: Training,
    best: dict[str, Any],
    losses: tuple[float, float],
    timings: tuple[float, float],
    evaluation: dict[str, Any],
) -> dict[str, Any]:
    """What ships with the agent: the command, the environment, training figures, evaluation,
    and the sha256 of the low-bit ops it was trained against (retrain when they change)."""
    envs = training.envs
    bc_final, last_loss = losses
    train_seconds, train_cpu_seconds = timings
    return {
        "command": "python -m tools.lbi_agent.train "
        + shlex.join(sys.argv[1:] if argv is None else list(argv)),
        "seed": args.seed,
        "version": FORMAT_VERSION,
        "state_spec": {
            "layout": list(STATE_SPEC),
            "bits": "width / 8",
            "losses": "Eq. 5, mean over quantized layers and steps of the last period",
            "changed": "time step of the last raise, -1 if never",
        },
        "environment": {**asdict(envs[0].cfg), "seed": [env.cfg.seed for env in envs]},
        "lowbit_sha256": lowbit_code_hash(),
        "training": {
            "teacher_episodes": args.teacher_episodes,
            "dqn_episodes": args.dqn_episodes,
            "gamma": args.gamma,
            "bc_gamma": args.bc_gamma,
            "bc_steps": args.bc_steps,
            "bc_weight": args.bc_weight,
            "kl_weight": args.kl_weight,
            "agent_lr": args.agent_lr,
            "updates_per_episode": args.updates_per_episode,
            "target_update": args.target_update,
            "epsilon": [args.epsilon_start, args.epsilon_end],
            "bc_final_loss": round(bc_final, 6),
            "dqn_final_loss": round(last_loss, 6),
            "trained_epochs": sum(env.trained_epochs for env in envs),
            "train_wall_seconds": round(train_seconds, 1),
            "train_cpu_seconds": round(train_cpu_seconds, 1),
            "threads": args.threads,
            "reference_accuracy": [
                round(env.reference.accuracy[-1], 3) for env in envs if env.reference
            ],
            "selection": [
                {
                    "after_dqn_episodes": c["after"],
                    "returns": [round(r, 5) for r in c["returns"]],
                    "mean_return": round(c["score"], 5),
                }
                for c in training.checks
            ],
            "selected_after_dqn_episodes": best["after"],
            "greedy_train_envs": best["records"],
        },
        "evaluation": evaluation,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run phases (a)-(f) of the module docstring, write the agent; returns its metadata."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    log = _Log(args.log)
    try:
        training = Training(args, build_environments(args, log), log)
        teacher_episodes = collect_teacher(training)
        teacher = TeacherSamples.from_episodes(
            [e.transitions for e in teacher_episodes], args.bc_gamma
        )
        replay = ReplayBuffer(args.replay_capacity)
        for episode in teacher_episodes:
            for transition in episode.transitions:
                replay.add(transition)
        agent, trainer, bc_final = pretrain(args, teacher)
        greedy_check(training, agent, 0)
        last_loss = run_dqn(training, agent, trainer, replay, teacher)
        best = select_policy(training.checks) if args.select_every else training.checks[-1]
        agent.q_net.load_state_dict(best["weights"])
        timings = (time.perf_counter() - started, time.process_time() - cpu_started)
        eval_seed = args.eval_seed if args.eval_seed is not None else args.seed + 1000
        evaluation = evaluate_fresh(agent, args, log, eval_seed)
        total_seconds = time.perf_counter() - started
    finally:
        log.close()
    agent.metadata = agent_metadata(
        args, argv, training, best, (bc_final, last_loss), timings, evaluation
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    agent.save(args.out)
    print(_summary_table(evaluation))
    print(
        f"training {timings[0]:.0f} s wall / {timings[1]:.0f} s CPU; "
        f"with the evaluation {total_seconds:.0f} s; agent written to {args.out}"
    )
    return agent.metadata


if __name__ == "__main__":
    main()
