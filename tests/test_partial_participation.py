"""Partial participation: per-client state of clients that skip rounds behaves as designed.

10 clients, 3 sampled per round (seeded: ``CommunicationStrategy.sample_clients``), 5 rounds:
state lives only in the nodes that trained, a client that missed the previous round gets a full
SignSGD model (never a sign it cannot apply), error feedback and virtual bits carry over the
rounds a client sat out, and LBI-FL decisions keep their interval per client.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from clients.fedbif import STATE_KEY as FEDBIF_STATE
from clients.lbi import STATE_KEY as LBI_STATE
from clients.update_compression import EF_STATE_KEY, SIGNSGD_STATE_KEY
from core.seeding import numpy_rng
from strategies.base import SAMPLING_SALT
from tools.inprocess import make_contexts, run_inprocess

CLIENTS, SAMPLED, ROUNDS, SEED = 10, 3, 5, 11
STATE_KEYS = {
    "fedbif": FEDBIF_STATE,
    "ef-signsgd": EF_STATE_KEY,
    "signsgd": SIGNSGD_STATE_KEY,
    "lbi-fl": LBI_STATE,
}


def sampled_partitions() -> list[set[int]]:
    """The partitions the server samples in rounds 1..ROUNDS (node i holds partition i - 1)."""
    return [
        {int(i) for i in numpy_rng(SEED, r, SAMPLING_SALT).choice(CLIENTS, SAMPLED, replace=False)}
        for r in range(1, ROUNDS + 1)
    ]


LBI = {"lbi-start": 1, "lbi-interval": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):  # noqa: ANN001, ANN201
    """One run per stateful method, shared by the tests: (server strategy, node contexts)."""
    cache: dict = {}

    def get(strategy: str):  # noqa: ANN202
        if strategy not in cache:
            extra = LBI if strategy == "lbi-fl" else {}
            cache[strategy] = run(strategy, tmp_path_factory.mktemp(strategy), **extra)
        return cache[strategy]

    return get


def run(strategy: str, tmp_path, **extra):  # noqa: ANN001, ANN003, ANN201
    raw = {
        "strategy": strategy,
        "device": "cpu",
        "seed": SEED,
        "num-server-rounds": ROUNDS,
        "fraction-fit": SAMPLED / CLIENTS,
        "local-epochs": 1,
        "partitioner": "iid",
        "results-dir": str(tmp_path),
        "checkpoint": False,
        **extra,
    }
    contexts = make_contexts(raw, CLIENTS)
    return run_inprocess(raw, CLIENTS, contexts=contexts), contexts


def test_the_seed_makes_clients_skip_and_return():
    """The other tests mean something only if some client sits a round out and comes back."""
    rounds = sampled_partitions()
    assert all(len(s) == SAMPLED for s in rounds)
    seen = [[r for r, s in enumerate(rounds) if p in s] for p in range(CLIENTS)]
    returning = [
        p for p in range(CLIENTS) if any(b - a > 1 for a, b in itertools.pairwise(seen[p]))
    ]
    assert returning


@pytest.mark.parametrize("strategy", sorted(STATE_KEYS))
def test_state_lives_only_in_clients_that_trained(runs, strategy):
    server, contexts = runs(strategy)
    trained = set().union(*sampled_partitions())
    for partition, context in enumerate(contexts):
        assert (STATE_KEYS[strategy] in context.state) == (partition in trained), partition
    assert all(row["clients"] == SAMPLED for row in server.history[1:])


def test_signsgd_sends_the_full_model_to_clients_that_missed_the_last_round(runs):
    server, _ = runs("signsgd")
    rounds = sampled_partitions()
    expected = [SAMPLED] + [len(now - before) for before, now in itertools.pairwise(rounds)]
    assert [int(row["full_downlinks"]) for row in server.history[1:]] == expected
    # Only the rest got the 1-bit vote: every round still aggregated all sampled clients.
    assert all(row["rejected"] == 0 and row["failures"] == 0 for row in server.history[1:])


def test_error_feedback_and_virtual_bits_carry_over_skipped_rounds(runs):
    rounds = sampled_partitions()
    twice = [p for p in range(CLIENTS) if sum(p in s for s in rounds) >= 2]
    assert twice, "the seed must sample some client twice"
    for strategy in ("ef-signsgd", "fedbif"):
        _, contexts = runs(strategy)
        for partition in twice:
            record = contexts[partition].state[STATE_KEYS[strategy]]
            values = next(iter(record.values())).numpy()
            assert np.all(np.isfinite(values)) and np.abs(values).max() > 0


def test_lbi_decisions_keep_their_interval_per_client(runs):
    _, contexts = runs("lbi-fl")
    rounds = sampled_partitions()
    for partition, context in enumerate(contexts):
        seen = [r for r, s in enumerate(rounds, start=1) if partition in s]
        if not seen:
            continue
        decided = int(context.state[LBI_STATE]["decided-round"])
        # Decisions happen at participations at least 2 rounds apart, the first one at once.
        decisions = [seen[0]]
        for r in seen[1:]:
            if r - decisions[-1] >= 2:
                decisions.append(r)
        assert decided == decisions[-1], (partition, seen, decided)


def test_dadaquant_knows_only_the_sizes_of_clients_it_heard(runs):
    server, _ = runs("dadaquant")
    heard = {str(p + 1) for p in set().union(*sampled_partitions())}
    assert set(server.sizes_seen) == heard
