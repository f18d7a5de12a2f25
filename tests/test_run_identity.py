"""Resume never changes a run, and results are never clobbered (``core.run_identity``)."""

from __future__ import annotations

import json

import pytest

from core.checkpoint import load_checkpoint, save_checkpoint
from core.config import ConfigError
from core.results import read_rounds
from core.run_identity import config_differences
from tools.inprocess import run_inprocess


def config(tmp_path, name, **extra):
    return {
        "strategy": "fedpaq",
        "device": "cpu",
        "num-server-rounds": 2,
        "seed": 3,
        "results-dir": str(tmp_path),
        "run-name": name,
        "local-epochs": 1,
        **extra,
    }


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize(
    ("key", "before", "after"),
    [
        ("fedpaq-bits", 4, 2),  # a method key
        ("entropy", "ans", "none"),  # a wire key
        ("link-profile", "iot", "none"),  # a link key
    ],
)
def test_resume_with_another_value_is_refused_before_anything_is_written(
    tmp_path, key, before, after
):
    run_inprocess(config(tmp_path, "r", **{key: before}), num_clients=3)
    folder = tmp_path / "r"
    written = snapshot(folder)
    with pytest.raises(ConfigError) as err:
        run_inprocess(
            config(
                tmp_path, "r", **{key: after, "num-server-rounds": 3, "resume-from": str(folder)}
            ),
            num_clients=3,
        )
    message = str(err.value)
    assert "\n" not in message and key in message
    assert repr(before) in message and repr(after) in message
    assert snapshot(folder) == written


def test_resume_with_the_same_config_and_more_rounds_continues(tmp_path):
    run_inprocess(config(tmp_path, "r", entropy="ans"), num_clients=3)
    run_inprocess(
        config(
            tmp_path,
            "r",
            entropy="ans",
            **{"num-server-rounds": 3, "resume-from": str(tmp_path / "r")},
        ),
        num_clients=3,
    )
    assert [row["round"] for row in read_rounds(tmp_path / "r" / "rounds.csv")] == [0, 1, 2, 3]


def test_resume_of_a_checkpoint_without_its_config_reads_the_summary_beside_it(tmp_path):
    """A checkpoint written before checkpoints held the run config: the summary.json of its
    folder stands in, so a changed key is still refused."""
    run_inprocess(config(tmp_path, "old", entropy="none"), num_clients=3)
    folder = tmp_path / "old"
    arrays, meta = load_checkpoint(folder)
    del meta["config"]
    save_checkpoint(folder, arrays, meta)
    with pytest.raises(ConfigError, match="entropy"):
        run_inprocess(
            config(tmp_path, "old", **{"num-server-rounds": 3, "resume-from": str(folder)}), 3
        )
    (folder / "summary.json").unlink()
    with pytest.raises(ConfigError, match="no run config stored"):
        run_inprocess(
            config(
                tmp_path,
                "old",
                entropy="none",
                **{"num-server-rounds": 3, "resume-from": str(folder)},
            ),
            3,
        )


def test_a_run_of_another_config_never_replaces_results(tmp_path):
    run_inprocess(config(tmp_path, "mine"), num_clients=3)
    folder = tmp_path / "mine"
    written = snapshot(folder)
    with pytest.raises(ConfigError) as err:
        run_inprocess(config(tmp_path, "mine", **{"num-server-rounds": 1}), num_clients=3)
    message = str(err.value)
    assert str(folder) in message and "num-server-rounds" in message and "overwrite" in message
    assert snapshot(folder) == written
    run_inprocess(config(tmp_path, "mine", **{"num-server-rounds": 1, "overwrite": True}), 3)
    assert json.loads((folder / "summary.json").read_text())["num_rounds"] == 1


def test_a_run_of_another_federation_size_never_replaces_results(tmp_path):
    run_inprocess(config(tmp_path, "fed"), num_clients=4)
    folder = tmp_path / "fed"
    written = snapshot(folder)
    with pytest.raises(ConfigError, match="4 clients, this run has 2"):
        run_inprocess(config(tmp_path, "fed"), num_clients=2)
    assert snapshot(folder) == written
    run_inprocess(config(tmp_path, "fed"), num_clients=4)  # the same run again: allowed


def test_default_folders_keep_a_short_run_beside_a_long_one(tmp_path):
    """The README's quick examples never land in the main job's folder."""
    base = {"strategy": "fedavg", "device": "cpu", "local-epochs": 1, "results-dir": str(tmp_path)}
    run_inprocess({**base, "num-server-rounds": 2}, num_clients=3)
    run_inprocess({**base, "num-server-rounds": 1}, num_clients=3)
    summaries = [json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")]
    assert sorted(s["num_rounds"] for s in summaries) == [1, 2]


def test_differences_count_a_missing_key_as_its_default_and_skip_locations():
    stored = {"seed": 1, "results-dir": "/a", "lr": 0.5}
    current = {"seed": 1, "results-dir": "/b", "lr": 0.5, "new-key": 3, "other-new": 0}
    assert config_differences(stored, current, defaults={"new-key": 0, "other-new": 0}) == [
        ("new-key", 0, 3)
    ]
    assert config_differences({"x": 1}, {"x": 1.0}) == []
    assert config_differences({"x": True}, {"x": 1}) == [("x", True, 1)]
