"""Hostile and faulty clients: the trust boundary, bounded influence and simulated attackers.

Whole runs are short (digits, 10 IID clients, 2 rounds, 1 local epoch, in-process): each attack
must leave a finite model, count what it did (rejected, failures, clipped), and the attacks that
the defenses neutralise exactly must give the clean run's model bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays

from clients.attacks import (
    INFLATED_EXAMPLES,
    attacking_partitions,
    bad_metrics,
    huge,
    nonfinite,
    wrong_dtype,
)
from contracts.messages import PARTITION_ID, TRAIN_LOSS, TRAIN_SECONDS
from core.config import ATTACKS
from fl_app.client_app import client_fn
from strategies.aggregation import clip_norms, combine, implausible, lower_median
from tests.helpers import build_test_strategy, fit_res, manager_with
from tools.inprocess import make_contexts, run_inprocess

CLIENTS, ROUNDS, SEED = 10, 2, 5
BASE = {
    "strategy": "fedavg",
    "device": "cpu",
    "partitioner": "iid",
    "local-epochs": 1,
    "num-server-rounds": ROUNDS,
    "seed": SEED,
    "checkpoint": False,
    "attack-stall-seconds": 0.1,
}


# --------------------------------------------------------------------------- attacker choice
def test_attackers_are_chosen_by_seed_with_the_configured_share():
    chosen = attacking_partitions(7, 10, 0.3)
    assert len(chosen) == 3 and chosen <= set(range(10))
    assert attacking_partitions(7, 10, 0.3) == chosen  # every node computes the same set
    assert any(attacking_partitions(s, 10, 0.3) != chosen for s in range(8, 16))
    assert len(attacking_partitions(7, 10, 0.01)) == 1  # a positive share is at least one
    assert attacking_partitions(7, 10, 0.0) == frozenset()
    assert len(attacking_partitions(7, 4, 1.0)) == 4


# --------------------------------------------------------------------------- payload tampering
def test_tampered_payloads_are_well_formed_but_hostile():
    arrays = [np.arange(6, dtype=np.uint8), np.array([-1.5, 2.0], np.float16), np.ones(3, "f4")]
    bad = nonfinite(arrays)
    assert np.isnan(bad[1][0]) and not np.isnan(arrays[1][0])  # a copy, the input untouched
    big = huge(arrays)
    np.testing.assert_array_equal(big[0], arrays[0])  # packed codes are left alone
    assert big[1].dtype == np.float16 and np.all(np.isfinite(big[1]))
    np.testing.assert_array_equal(np.abs(big[1]), np.finfo(np.float16).max / 2)
    assert big[1][0] < 0 < big[1][1]
    wide = wrong_dtype(arrays)
    assert [a.dtype for a in wide] == [np.uint8, np.float32, np.float64]
    assert wide[1][0] > np.finfo(np.float16).max and wide[2][0] > np.finfo(np.float32).max
    np.testing.assert_array_equal(wide[1][1:], arrays[1][1:])
    metrics = bad_metrics(
        {PARTITION_ID: 3, TRAIN_LOSS: 0.5, TRAIN_SECONDS: 1.0, "lbi-weight-bits": 4, "x": 2.0}
    )
    assert metrics[PARTITION_ID] == 3 and metrics["lbi-weight-bits"] == 32
    assert np.isnan(metrics[TRAIN_LOSS]) and metrics[TRAIN_SECONDS] < 0 and np.isnan(metrics["x"])


# --------------------------------------------------------------------------- aggregation rules
def test_lower_median_and_norm_rules():
    assert lower_median([5.0, 1.0]) == 1.0 and lower_median([3.0, 1.0, 2.0]) == 2.0
    deltas = [np.full(4, v, np.float32) for v in (1.0, 1.0, 2.0, 500.0)]
    assert implausible(deltas, 100.0) == [False, False, False, True]
    assert implausible(deltas, 0.0) == [False] * 4
    clipped, count = clip_norms(deltas, 3.0)
    assert count == 1
    np.testing.assert_allclose(np.linalg.norm(clipped[3]), 3 * np.linalg.norm(deltas[0]))
    np.testing.assert_array_equal(clipped[2], deltas[2])


def test_robust_rules_are_coordinate_wise():
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=7).astype(np.float32) for _ in range(5)]
    stacked = np.stack(deltas).astype(np.float64)
    weights = np.full(5, 0.2)
    np.testing.assert_allclose(combine(deltas, weights, [7], "median"), np.median(stacked, 0))
    trimmed = np.sort(stacked, 0)[1:-1].mean(0)  # floor(0.2 * 5) = 1 off each end
    np.testing.assert_allclose(combine(deltas, weights, [7], "trimmed-mean", 0.2), trimmed)
    per_segment = np.array([[0.5, 0.0], [0.5, 1.0], [0, 0], [0, 0], [0, 0]], dtype=np.float64)
    got = combine(deltas, per_segment, [3, 4], "mean")
    np.testing.assert_allclose(got[:3], 0.5 * (stacked[0, :3] + stacked[1, :3]))
    np.testing.assert_allclose(got[3:], stacked[1, 3:])


# --------------------------------------------------------------------------- the trust boundary
def test_a_refused_aggregate_keeps_the_model(tmp_path, monkeypatch):
    strategy = build_test_strategy(BASE, tmp_path)
    before = [a.copy() for a in strategy.global_state]
    (p0, _), (p1, _) = strategy.configure_fit(1, Parameters([], ""), manager_with(2))
    state = [a + 0.01 for a in before]
    results = [(p, fit_res(state, 10, partition_id=k)) for k, p in enumerate((p0, p1))]

    def exploding(server_round, updates):  # noqa: ANN001, ANN202
        return [a + np.float32(np.inf) for a in before]

    monkeypatch.setattr(strategy, "aggregate", exploding)
    strategy.aggregate_fit(1, results, [])
    assert strategy.traffic[1].aggregate_refused == 1
    for got, want in zip(strategy.global_state, before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_running_variances_are_floored_at_zero(tmp_path):
    strategy = build_test_strategy(BASE, tmp_path)
    (p0, _), (p1, _) = strategy.configure_fit(1, Parameters([], ""), manager_with(2))
    keys = [k for k in strategy.model.state_dict() if "running_var" in k]
    assert keys and strategy._variance_indices
    state = [a.copy() for a in strategy.global_state]
    for index in strategy._variance_indices:
        state[index] = np.full_like(state[index], -0.5)  # a quantized mean can land below 0
    strategy.aggregate_fit(1, [(p0, fit_res(state, 10, 0)), (p1, fit_res(state, 10, 1))], [])
    for index in strategy._variance_indices:
        np.testing.assert_array_equal(strategy.global_state[index], 0.0)
    weights = [i for i in range(len(state)) if i not in strategy._variance_indices]
    np.testing.assert_array_equal(strategy.global_state[weights[0]], state[weights[0]])


def test_a_float64_message_is_refused_even_when_its_values_fit(tmp_path):
    strategy = build_test_strategy(BASE, tmp_path)
    (proxy, _), _ = strategy.configure_fit(1, Parameters([], ""), manager_with(2))
    wide = [a.astype(np.float64) for a in strategy.global_state]
    strategy.aggregate_fit(1, [(proxy, fit_res(ndarrays_to_parameters(wide), 10))], [])
    assert strategy.traffic[1].rejected == 1


# --------------------------------------------------------------------------- poisoning hooks
def trained_uplink(tmp_path, attack: str, strategy: str = "fedavg"):  # noqa: ANN201
    """(received arrays, uplink arrays) of partition 0's first fit under ``attack``, with that
    partition forced to attack (attack-fraction 1)."""
    raw = {**BASE, "strategy": strategy, "results-dir": str(tmp_path), "attack": attack}
    raw["attack-fraction"] = 1.0
    server = build_test_strategy(raw, tmp_path)
    (_, ins), _ = server.configure_fit(1, Parameters([], ""), manager_with(2))
    context = make_contexts(raw, 2)[0]
    res = client_fn(context).fit(ins)
    return server, parameters_to_ndarrays(ins.parameters), parameters_to_ndarrays(res.parameters)


def test_sign_flip_and_scaled_update_change_exactly_the_update(tmp_path):
    _, received, honest = trained_uplink(tmp_path / "h", "none")
    _, _, flipped = trained_uplink(tmp_path / "f", "sign-flip")
    _, _, scaled = trained_uplink(tmp_path / "s", "scaled-update")
    for r, h, f, s in zip(received, honest, flipped, scaled, strict=True):
        np.testing.assert_allclose(f, r - (h - r), rtol=0, atol=1e-5)
        np.testing.assert_allclose(s, r + 10.0 * (h - r), rtol=0, atol=1e-4)


def test_fedbat_attacker_flips_bits_and_scales_steps(tmp_path):
    server, _, honest = trained_uplink(tmp_path / "h", "none", "fedbat")
    _, _, flipped = trained_uplink(tmp_path / "f", "sign-flip", "fedbat")
    _, _, scaled = trained_uplink(tmp_path / "s", "scaled-update", "fedbat")
    d = server.split.num_quantized
    bits = [np.unpackbits(a[0], bitorder="little")[:d] for a in (honest, flipped)]
    np.testing.assert_array_equal(bits[1], 1 - bits[0])
    np.testing.assert_array_equal(flipped[1], honest[1])
    np.testing.assert_array_equal(scaled[0], honest[0])
    np.testing.assert_allclose(scaled[1], 10.0 * honest[1], rtol=1e-6)


# --------------------------------------------------------------------------- whole runs
@pytest.fixture(scope="module")
def clean(tmp_path_factory):  # noqa: ANN001, ANN201
    return run_inprocess({**BASE, "results-dir": str(tmp_path_factory.mktemp("clean"))}, CLIENTS)


def attacked(tmp_path, attack: str, **extra):  # noqa: ANN001, ANN003, ANN201
    raw = {**BASE, "results-dir": str(tmp_path), "attack": attack, "attack-fraction": 0.3, **extra}
    return run_inprocess(raw, CLIENTS)


def totals(strategy, field: str) -> int:  # noqa: ANN001
    return sum(getattr(t, field) for t in strategy.traffic.values())


@pytest.mark.parametrize("attack", ["nonfinite", "huge", "wrong-dtype", "bad-metrics"])
def test_malformed_or_absurd_messages_are_rejected_and_the_run_goes_on(tmp_path, attack, clean):
    strategy = attacked(tmp_path, attack)
    assert strategy.summary()["completed"]
    assert totals(strategy, "rejected") == 3 * ROUNDS
    assert all(np.all(np.isfinite(a)) for a in strategy.global_state)
    assert strategy.history[-1]["accuracy"] > clean.history[-1]["accuracy"] - 0.1


@pytest.mark.parametrize("attack", ["inflate-examples", "stall"])
def test_neutralised_attacks_leave_the_clean_model(tmp_path, attack, clean):
    strategy = attacked(tmp_path, attack)
    for got, want in zip(strategy.global_state, clean.global_state, strict=True):
        np.testing.assert_array_equal(got, want)


def test_crashing_clients_are_failures(tmp_path):
    strategy = attacked(tmp_path, "crash")
    assert totals(strategy, "failures") == 3 * ROUNDS and strategy.summary()["completed"]


def test_scaled_updates_are_clipped(tmp_path, clean):
    strategy = attacked(tmp_path, "scaled-update")
    assert totals(strategy, "clipped") >= 3 * ROUNDS
    assert all(np.all(np.isfinite(a)) for a in strategy.global_state)


def test_every_attack_kind_is_documented():
    from clients import attacks

    assert all(f"``{kind}``" in attacks.__doc__ for kind in ATTACKS if kind != "none")
    assert INFLATED_EXAMPLES > 1000


# --------------------------------------------------------------------------- bounds, second pass
@pytest.mark.parametrize(
    ("count", "fraction", "cut"),
    [
        (3, 0.1, 1),
        (5, 0.1, 1),
        (9, 0.1, 1),
        (10, 0.1, 1),
        (20, 0.1, 2),
        (4, 0.49, 1),
        (7, 0.49, 3),
        (2, 0.1, 0),
        (5, 0.0, 0),
    ],
)
def test_the_trimmed_mean_trims_at_least_one_per_side_from_three_updates(count, fraction, cut):
    from strategies.aggregation import trim_count

    assert trim_count(fraction, count) == cut
    rng = np.random.default_rng(count)
    deltas = [rng.normal(size=4) for _ in range(count)]
    deltas[0] = np.full(4, 1e5)  # one hostile update: gone wherever one is trimmed
    got = combine(deltas, np.full(count, 1 / count), [4], "trimmed-mean", fraction)
    ordered = np.sort(np.stack(deltas), 0)
    np.testing.assert_allclose(got, ordered[cut : count - cut].mean(0))
    assert (np.abs(got) < 1e4).all() == (cut > 0)


@pytest.mark.parametrize(("rule", "clients"), [("trimmed-mean", 2), ("median", 2)])
def test_a_robust_rule_that_cannot_protect_says_so(tmp_path, rule, clients, caplog):
    strategy = run_inprocess(
        {**BASE, "results-dir": str(tmp_path), "aggregation": rule, "num-server-rounds": 1},
        num_clients=clients,
    )
    assert strategy.history[-1]["aggregation_degraded"] == 1
    assert strategy.summary()["aggregation_degraded_rounds"] == 1
    assert any(f"aggregation={rule}" in r.getMessage() for r in caplog.records)
    three = run_inprocess(
        {**BASE, "results-dir": str(tmp_path / "3"), "aggregation": rule, "num-server-rounds": 1},
        num_clients=3,
    )
    assert three.summary()["aggregation_degraded_rounds"] == 0


def _claims(strategy, claims: list[tuple[int, int]]):
    """ClientUpdates claiming (partition id, examples), capped as the strategy caps them."""
    from strategies.aggregation import ClientUpdate

    updates = [
        ClientUpdate(str(1000 + k), partition, examples, [], {})
        for k, (partition, examples) in enumerate(claims)
    ]
    strategy._cap_examples(1, updates)
    return [u.num_examples for u in updates]


def test_an_unknown_partition_id_is_capped_at_the_largest_known_partition(tmp_path):
    strategy = build_test_strategy({**BASE, "partitioner": "dirichlet"}, tmp_path)
    strategy.progress.num_clients = 4
    sizes = strategy._known_sizes()
    assert sizes is not None and len(sizes) == 4
    capped = _claims(strategy, [(0, 10**6), (1, sizes[1]), (99, 10**6)])
    assert capped == [sizes[0], sizes[1], max(sizes)]


def test_where_sizes_are_unknown_no_minority_sets_the_cap(tmp_path):
    strategy = build_test_strategy(BASE, tmp_path)
    strategy.partition_sizes = None  # e.g. hub or file data: the server cannot compute sizes
    # Two clients: the hostile claim does not move the cap (the lower median is the honest one).
    assert _claims(strategy, [(0, 100), (1, 10**9)]) == [100, 1000]
    # Three clients, one hostile: capped at 10 x the lower median, an honest claim.
    assert _claims(strategy, [(0, 100), (1, 120), (2, 10**9)]) == [100, 120, 1200]


def test_a_zero_error_clipped_uq_client_is_bounded_relative_to_the_others(tmp_path):
    """cuq-weight-cap: at most 10 x the lower median weight, whatever the reported error; 0
    gives the paper's inverse-error weights."""
    from compression.clipped_quant import inverse_error_weights
    from strategies.cuq import capped_weights

    errors = np.array([[0.0, 1.0], [1.0, 1.0]])  # client 0 claims zero error in layer 0
    weights = capped_weights(inverse_error_weights(errors), 10.0)
    np.testing.assert_allclose(weights[:, 0], [10 / 11, 1 / 11])
    np.testing.assert_allclose(weights[:, 1], [0.5, 0.5])
    paper = np.array([[0.01], [1.0], [2.0]])
    np.testing.assert_allclose(
        capped_weights(inverse_error_weights(paper), 0.0)[:, 0],
        inverse_error_weights(paper)[:, 0],
    )
    three = capped_weights(inverse_error_weights(np.array([[0.0], [1.0], [1.0]])), 10.0)
    np.testing.assert_allclose(three[:, 0], [10 / 12, 1 / 12, 1 / 12])
