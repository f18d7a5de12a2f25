"""Checkpoint every round; a run killed after round k resumes at k + 1 and matches a clean run."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Context

from core.checkpoint import CHECKPOINT_NAME, load_checkpoint
from core.config import ConfigError
from core.results import read_rounds
from fl_app.client_app import client_fn
from tools.inprocess import run_inprocess

COMPARED = ("round", "accuracy", "loss", "train_loss", "uplink_bytes", "downlink_bytes", "clients")


def config(tmp_path, name, **extra):
    return {
        "strategy": "fedavg",
        "device": "cpu",
        "num-server-rounds": 5,
        "fraction-fit": 0.6,
        "seed": 3,
        "results-dir": str(tmp_path),
        "run-name": name,
        "local-epochs": 1,
        **extra,
    }


def killed_after(round_done: int):
    """A client_fn that 'kills' the process (KeyboardInterrupt) in round ``round_done + 1``."""

    def flaky(context: Context):
        client = client_fn(context)
        original_fit = client.fit

        def fit(ins):
            if int(ins.config["server-round"]) == round_done + 1:
                raise KeyboardInterrupt("killed")
            return original_fit(ins)

        client.fit = fit
        return client

    return flaky


@pytest.mark.parametrize("strategy", ["fedavg", "dadaquant", "clipped-uq", "fedbat"])
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, strategy):
    """Methods whose clients keep no state between rounds resume exactly (server state such as
    DAdaQuant's levels is in the checkpoint)."""
    clean = run_inprocess(config(tmp_path, "clean", strategy=strategy), num_clients=5)

    with pytest.raises(KeyboardInterrupt):
        run_inprocess(
            config(tmp_path, "cut", strategy=strategy), num_clients=5, client_fn=killed_after(3)
        )
    arrays, meta = load_checkpoint(tmp_path / "cut")
    assert meta["round"] == 3
    assert [row["round"] for row in read_rounds(tmp_path / "cut" / "rounds.csv")] == [0, 1, 2, 3]

    resumed = run_inprocess(
        config(tmp_path, "cut", strategy=strategy, **{"resume-from": str(tmp_path / "cut")}),
        num_clients=5,
    )
    rows = read_rounds(tmp_path / "cut" / "rounds.csv")
    clean_rows = read_rounds(tmp_path / "clean" / "rounds.csv")
    assert [row["round"] for row in rows] == [0, 1, 2, 3, 4, 5]
    for got, want in zip(rows, clean_rows, strict=True):
        for column in COMPARED:
            assert got[column] == want[column] or (
                np.isnan(got[column]) and np.isnan(want[column])
            ), column
    for got, want in zip(resumed.global_state, clean.global_state, strict=True):
        np.testing.assert_array_equal(got, want)
    summary = resumed.summary()
    assert summary["completed"] and summary["uplink_bytes"] == clean.summary()["uplink_bytes"]


def test_resuming_with_another_strategy_is_refused(tmp_path):
    run_inprocess(config(tmp_path, "a", **{"num-server-rounds": 1}), num_clients=3)
    with pytest.raises(ConfigError, match=r"strategy: 'fedavg' \(stored\) vs 'fedbat' \(now\)"):
        run_inprocess(
            config(tmp_path, "b", strategy="fedbat", **{"resume-from": str(tmp_path / "a")}), 3
        )


def test_checkpoint_is_written_every_round_and_can_be_disabled(tmp_path):
    run_inprocess(config(tmp_path, "on", **{"num-server-rounds": 2}), num_clients=3)
    _, meta = load_checkpoint(tmp_path / "on" / CHECKPOINT_NAME)
    assert meta["round"] == 2 and len(meta["history"]) == 3
    run_inprocess(
        config(tmp_path, "off", **{"num-server-rounds": 1, "checkpoint": False}), num_clients=3
    )
    assert not (tmp_path / "off" / CHECKPOINT_NAME).exists()


def test_resuming_a_finished_run_is_a_clear_error(tmp_path):
    run_inprocess(config(tmp_path, "done", **{"num-server-rounds": 1}), num_clients=3)
    with pytest.raises(ConfigError, match="already holds 1 rounds"):
        run_inprocess(
            config(
                tmp_path, "done", **{"num-server-rounds": 1, "resume-from": str(tmp_path / "done")}
            ),
            3,
        )


def test_round_with_too_few_results_is_skipped(tmp_path):
    def crash_two(context: Context):
        if context.node_config["partition-id"] < 2:
            raise RuntimeError("simulated crash")
        return client_fn(context)

    strategy = run_inprocess(
        config(
            tmp_path, "few", **{"num-server-rounds": 2, "fraction-fit": 1.0, "min-fit-results": 2}
        ),
        num_clients=3,
        client_fn=crash_two,
    )
    initial = strategy.history[0]
    assert [row["clients"] for row in strategy.history[1:]] == [1, 1]
    assert strategy.history[-1]["accuracy"] == initial["accuracy"]  # model never changed


def _tampered(tmp_path, name: str, strategy: str, change) -> tuple:  # noqa: ANN001
    """A 2-round run whose checkpoint ``change(arrays, meta)`` edits; (folder, rounds.csv)."""
    from core.checkpoint import save_checkpoint

    run_inprocess(config(tmp_path, name, strategy=strategy, **{"num-server-rounds": 2}), 3)
    folder = tmp_path / name
    arrays, meta = load_checkpoint(folder)
    change(arrays, meta)
    save_checkpoint(folder, arrays, meta)
    return folder, (folder / "rounds.csv").read_bytes()


@pytest.mark.parametrize(
    ("strategy", "change", "reason"),
    [
        ("fedavg", lambda a, m: a.__setitem__("global/0", a["global/0"] * 1e9), "1e+06"),
        ("dadaquant", lambda a, m: m["method"].__setitem__("levels", 1000), "levels 1000"),
        ("fedavg", lambda a, m: m.__setitem__("round", 7), "claims round 7"),
        ("fedavg", lambda a, m: m["history"].append("not a row"), "not a row"),
    ],
    ids=["huge-model", "method-state-out-of-range", "round-beyond-history", "bad-history"],
)
def test_a_tampered_checkpoint_is_refused_before_rounds_csv_changes(
    tmp_path, strategy, change, reason
):
    folder, before = _tampered(tmp_path, "t", strategy, change)
    with pytest.raises(ConfigError) as err:
        run_inprocess(
            config(
                tmp_path,
                "t",
                strategy=strategy,
                **{"num-server-rounds": 10, "resume-from": str(folder)},
            ),
            3,
        )
    assert reason in str(err.value) and "\n" not in str(err.value)
    assert (folder / "rounds.csv").read_bytes() == before


def test_a_checkpoint_of_an_earlier_version_resumes_with_the_columns_it_lacked(tmp_path):
    """Rows written before a column existed get it as "not recorded"; the resumed run writes
    every column of this version and goes on."""

    def older(arrays, meta):  # noqa: ANN001
        for row in meta["history"]:
            row.pop("aggregation_degraded")
        for traffic in meta["traffic"].values():
            traffic.pop("aggregation_degraded")

    folder, _ = _tampered(tmp_path, "old", "fedavg", older)
    run_inprocess(
        config(tmp_path, "old", **{"num-server-rounds": 3, "resume-from": str(folder)}), 3
    )
    rows = read_rounds(folder / "rounds.csv")
    assert [row["round"] for row in rows] == [0, 1, 2, 3]
    assert np.isnan(rows[1]["aggregation_degraded"]) and rows[3]["aggregation_degraded"] == 0
