"""FedAvg on the strategy base: exact byte accounting, aggregation, rejection, sampling, results."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.common import Parameters

from core.results import ROUND_COLUMNS, read_rounds
from fl_app.methods import load_config
from fl_app.server_app import build_strategy
from strategies.accounting import bits_per_parameter
from tests.helpers import fit_res, manager_with


def make_strategy(tmp_path, **overrides):
    raw = {
        "strategy": "fedavg",
        "results-dir": str(tmp_path),
        "run-name": "t",
        "device": "cpu",
        "min-available-clients": 1,
    }
    raw.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return build_strategy(load_config(raw)[0])


def npy_header_bytes(shape: tuple[int, ...]) -> int:
    """Hand count of an ``np.save`` (format 1.0) header of a little-endian float32 C array:
    6 magic + 2 version + 2 length bytes, then the dict text padded with spaces and a newline
    to a multiple of 64 bytes in total."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape!r}, }}"
    unpadded = 10 + len(text) + 1
    return -(-unpadded // 64) * 64


def test_fedavg_message_bytes_match_a_hand_count(tmp_path):
    strategy = make_strategy(tmp_path)
    state = strategy.global_state
    expected = sum(4 * a.size + npy_header_bytes(a.shape) for a in state)
    assert expected == 4 * strategy.num_scalars + 128 * len(state)  # every header is 128 here

    manager = manager_with(4)
    instructions = strategy.configure_fit(1, Parameters([], ""), manager)
    assert len(instructions) == 4
    assert strategy.traffic[1].downlink_bytes == 4 * expected
    results = [
        (proxy, fit_res(state, num_examples=5, partition_id=i))
        for i, (proxy, _) in enumerate(instructions)
    ]
    strategy.aggregate_fit(1, results, [])
    assert strategy.traffic[1].uplink_bytes == 4 * expected
    row = strategy.round_row(1, 0.0, 0.0)
    assert row["uplink_bpp"] == pytest.approx(8 * expected / strategy.num_scalars)
    assert 32.0 < row["uplink_bpp"] < 32.5 and 32.0 < row["downlink_bpp"] < 32.5


def test_bpp_definition():
    assert bits_per_parameter(nbytes=400, num_scalars=100, messages=1) == 32.0
    assert bits_per_parameter(nbytes=400, num_scalars=100, messages=4) == 8.0
    assert bits_per_parameter(nbytes=0, num_scalars=100, messages=0) == 0.0


def test_weighted_average_is_exact(tmp_path):
    strategy = make_strategy(tmp_path)
    ones = [np.ones_like(a) for a in strategy.global_state]
    # Twos, not threes: their delta stays within update-norm-bound (3) x the other's norm.
    twos = [2 * np.ones_like(a) for a in strategy.global_state]
    manager = manager_with(2)
    (p0, _), (p1, _) = strategy.configure_fit(1, Parameters([], ""), manager)
    strategy.aggregate_fit(
        1,
        [(p1, fit_res(twos, 300, partition_id=1)), (p0, fit_res(ones, 100, partition_id=0))],
        [],
    )
    assert strategy.traffic[1].clipped == 0
    for array in strategy.global_state:
        np.testing.assert_allclose(array, 1.75, rtol=0, atol=1e-6)
        assert array.dtype == np.float32


def malformed_payloads(state):
    garbage = Parameters(tensors=[b"not a numpy array"], tensor_type="numpy.ndarray")
    bad_shape = [a.reshape(-1) if a.ndim > 1 else a for a in state]
    with_nan = [a.copy() for a in state]
    with_nan[0].flat[0] = np.nan
    return {
        "garbage bytes": fit_res(garbage),
        "too few arrays": fit_res(state[:-1]),
        "wrong shape": fit_res(bad_shape),
        "int dtype": fit_res([a.astype(np.int32) for a in state]),
        "nan": fit_res(with_nan),
        "zero examples": fit_res(state, num_examples=0),
        "no partition id": fit_res(state, partition_id=None),
    }


def test_malformed_payloads_are_rejected_and_the_round_goes_on(tmp_path, caplog):
    clean = make_strategy(tmp_path / "clean")
    state = clean.global_state
    good = [[a + 1.0 for a in state], [a - 0.5 for a in state]]
    manager = manager_with(2 + 7)
    proxies = [p for p, _ in clean.configure_fit(1, Parameters([], ""), manager)]
    clean.aggregate_fit(
        1, [(proxies[i], fit_res(good[i], 10 + i, partition_id=i)) for i in range(2)], []
    )

    dirty = make_strategy(tmp_path / "dirty")
    dirty.configure_fit(1, Parameters([], ""), manager)
    bad = malformed_payloads(dirty.global_state)
    results = [(proxies[i], fit_res(good[i], 10 + i, partition_id=i)) for i in range(2)]
    results += [(proxies[2 + i], res) for i, res in enumerate(bad.values())]
    dirty.aggregate_fit(1, results, [RuntimeError("client crashed")])

    for got, want in zip(dirty.global_state, clean.global_state, strict=True):
        np.testing.assert_array_equal(got, want)
    traffic = dirty.traffic[1]
    assert traffic.rejected == len(bad) and traffic.failures == 1
    assert traffic.uplink_messages == len(results)
    rejected_lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected_lines) == len(bad)
    for reason in (
        "undecodable",
        "expected",
        "shape",
        "expected float32",
        "NaN",
        "num_examples",
        "partition-id",
    ):
        assert any(reason in line for line in rejected_lines), reason


def test_round_without_usable_update_keeps_the_model(tmp_path):
    strategy = make_strategy(tmp_path)
    before = [a.copy() for a in strategy.global_state]
    ((proxy, _),) = strategy.configure_fit(1, Parameters([], ""), manager_with(1))
    strategy.aggregate_fit(1, [(proxy, fit_res(before[:1]))], [])
    for got, want in zip(strategy.global_state, before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_sampling_is_seeded_and_respects_fraction(tmp_path):
    def chosen(seed, server_round):
        strategy = make_strategy(tmp_path, seed=seed, fraction_fit=0.5)
        instructions = strategy.configure_fit(server_round, Parameters([], ""), manager_with(10))
        return [proxy.cid for proxy, _ in instructions]

    assert len(chosen(1, 1)) == 5
    assert chosen(1, 1) == chosen(1, 1)
    assert len({tuple(chosen(1, r)) for r in range(1, 6)}) > 1
    assert chosen(1, 1) != chosen(2, 1) or chosen(1, 2) != chosen(2, 2)


def run_two_unchanged_rounds(strategy) -> None:  # noqa: ANN001
    """Rounds 0-2 with two clients that send back the global model (every file gets written)."""
    strategy.evaluate(0, Parameters([], ""))
    manager = manager_with(2)
    for server_round in (1, 2):
        instructions = strategy.configure_fit(server_round, Parameters([], ""), manager)
        results = [
            (p, fit_res(strategy.global_state, 7, partition_id=i))
            for i, (p, _) in enumerate(instructions)
        ]
        strategy.aggregate_fit(server_round, results, [])
        strategy.evaluate(server_round, Parameters([], ""))


def test_results_files_written_every_round(tmp_path):
    strategy = make_strategy(tmp_path, num_server_rounds=2)
    run_two_unchanged_rounds(strategy)
    run_dir = tmp_path / "t"
    rows = read_rounds(run_dir / "rounds.csv")
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert set(ROUND_COLUMNS) <= set(rows[0])
    assert rows[1]["uplink_bytes"] == strategy.traffic[1].uplink_bytes > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    for field in (
        "strategy",
        "dataset",
        "model",
        "partitioner",
        "num_clients",
        "num_rounds",
        "num_params",
        "final_accuracy",
        "best_accuracy",
        "uplink_bytes",
        "downlink_bytes",
        "uplink_bpp",
        "downlink_bpp",
        "wall_seconds",
        "config",
    ):
        assert field in summary, field
    assert summary["completed"] is True and summary["num_clients"] == 2
    assert summary["uplink_bytes"] == sum(t.uplink_bytes for t in strategy.traffic.values())
    assert summary["config"]["strategy"] == "fedavg"
    # Both directions: bytes add up, and bpp is per participating client and round, both ways.
    for row in rows[1:]:
        assert row["total_bytes"] == row["uplink_bytes"] + row["downlink_bytes"]
        assert row["total_bpp"] == pytest.approx(row["uplink_bpp"] + row["downlink_bpp"])
    assert summary["total_bytes"] == summary["uplink_bytes"] + summary["downlink_bytes"]
    assert summary["total_bpp"] == pytest.approx(summary["uplink_bpp"] + summary["downlink_bpp"])
    assert 64.0 < summary["total_bpp"] < 65.0  # float32 both ways plus .npy headers


@pytest.mark.parametrize("fraction", [0.0, 0.1])
def test_validation_columns_and_the_run_plot(tmp_path, fraction):
    """With a validation split the server scores the model on it every round (rounds.csv
    val_accuracy/val_loss, summary final/best_val_accuracy); without one they are NaN/null.
    Every run, either way, draws its curves.png."""
    import math

    from core.plots import PLOT_NAME

    strategy = make_strategy(tmp_path, num_server_rounds=2, validation_fraction=fraction)
    assert (strategy.validation_set is not None) == (fraction > 0)
    run_two_unchanged_rounds(strategy)
    run_dir = tmp_path / "t"
    rows = read_rounds(run_dir / "rounds.csv")
    summary = json.loads((run_dir / "summary.json").read_text())
    if fraction:
        assert len(strategy.validation_set) == 144  # 10% of digits' 1,437 training images
        assert all(0.0 <= row["val_accuracy"] <= 1.0 and row["val_loss"] > 0 for row in rows)
        assert summary["final_val_accuracy"] == rows[-1]["val_accuracy"]
        assert summary["best_val_accuracy"] == max(row["val_accuracy"] for row in rows)
    else:
        assert all(math.isnan(row["val_accuracy"]) and math.isnan(row["val_loss"]) for row in rows)
        assert summary["final_val_accuracy"] is None and summary["best_val_accuracy"] is None
    assert (run_dir / PLOT_NAME).stat().st_size > 5000
