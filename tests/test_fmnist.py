"""Fashion-MNIST from its original IDX files: the reader, the sources, partitions, a flwr run.

The real files come from Debian's ``dataset-fashion-mnist`` package (``.ci/run`` installs it
where ``apt-get`` works); where they are absent those tests skip, and a tiny IDX fixture written
here exercises the same reader.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from core.results import read_rounds
from fl_app import data
from tools.launch import launch

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
REAL = pytest.mark.skipif(
    not data.has_idx_files(DEBIAN),
    reason=f"no Fashion-MNIST IDX files in {DEBIAN} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True)
def _fresh_caches():
    data.clear_caches()
    yield
    data.clear_caches()


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """An IDX file as the format defines it: 0, 0, type 0x08 (uint8), ndim, big-endian dims."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def write_fixture(folder: Path, n_train: int = 60, n_test: int = 20, compress: bool = True):
    """Random 28x28 images with balanced labels in the four IDX files; returns the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        image_name, label_name = data.IDX_FILES[split]
        write_idx(folder / image_name, images, compress)
        write_idx(folder / label_name, labels, compress)
        arrays[split] = (images, labels)
    return arrays


def raw_pixels(ds: torch.utils.data.TensorDataset) -> np.ndarray:
    spec = data.DATASETS.get("fmnist")
    x = ds.tensors[0] * spec.std[0] + spec.mean[0]
    return np.rint(x.numpy() * 255).astype(np.uint8)[:, 0]


@pytest.mark.parametrize("compress", [True, False])
def test_idx_fixture_round_trips_through_the_loader(tmp_path, compress):
    written = write_fixture(tmp_path / "idx", compress=compress)
    folder = str(tmp_path / "idx")
    assert data.source_of(data.DATASETS.get("fmnist"), folder) == (data.IDX, folder)
    test = data.load_test_set("fmnist", data_files=folder)
    assert test.tensors[0].shape == (20, 1, 28, 28) and test.tensors[0].dtype == torch.float32
    np.testing.assert_array_equal(raw_pixels(test), written["test"][0])
    np.testing.assert_array_equal(test.tensors[1].numpy(), written["test"][1])
    for kind, n in (("iid", 4), ("dirichlet", 3), ("label-count", 5)):
        parts = [
            data.load_partition(
                "fmnist",
                p,
                n,
                partitioner=kind,
                alpha=0.5,
                labels_per_client=2,
                seed=1,
                data_files=folder,
            )
            for p in range(n)
        ]
        if kind == "label-count":  # every partition holds at most its 2 classes
            assert all(len(set(p.tensors[1].tolist())) <= 2 for p in parts)
        else:  # together the partitions are exactly the training images
            got = Counter(row.tobytes() for p in parts for row in raw_pixels(p))
            assert got == Counter(row.tobytes() for row in written["train"][0])


def test_partitions_repeat_with_the_seed_and_change_without(tmp_path):
    write_fixture(tmp_path / "idx")
    kwargs = dict(partitioner="dirichlet", alpha=0.5, labels_per_client=2)
    folder = str(tmp_path / "idx")
    first = data.load_partition("fmnist", 0, 3, seed=5, data_files=folder, **kwargs)
    data.clear_caches()
    again = data.load_partition("fmnist", 0, 3, seed=5, data_files=folder, **kwargs)
    other = data.load_partition("fmnist", 0, 3, seed=6, data_files=folder, **kwargs)
    assert torch.equal(first.tensors[0], again.tensors[0])
    assert not (len(first) == len(other) and torch.equal(first.tensors[0], other.tensors[0]))


def test_malformed_idx_files_are_refused_with_a_reason(tmp_path):
    write_fixture(tmp_path / "short", n_train=30)
    labels = tmp_path / "short" / "train-labels-idx1-ubyte.gz"
    labels.unlink()
    write_idx(labels.with_suffix(""), np.zeros(29, np.uint8), compress=True)
    with pytest.raises(ValueError, match="30 train images but 29 labels"):
        data.load_test_set("fmnist", data_files=str(tmp_path / "short"))
    folder = tmp_path / "small"
    write_fixture(folder)
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((20, 14, 14), np.uint8), False)
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(ValueError, match="expected 28x28 images"):
        data.load_test_set("fmnist", data_files=str(folder))


def test_without_idx_files_the_hub_is_the_fallback(tmp_path, monkeypatch):
    spec = dataclasses.replace(data.DATASETS.get("fmnist"), idx_dirs=(str(tmp_path / "none"),))
    assert data.source_of(spec, "") == (data.HUB, "")
    (tmp_path / "parquet").mkdir()
    assert data.source_of(spec, str(tmp_path / "parquet"))[0] == data.FILES


@REAL
def test_real_files_have_the_published_shapes_and_label_counts():
    for split, n, per_class in (("train", 60_000, 6_000), ("test", 10_000, 1_000)):
        images, labels = data.read_idx_split(DEBIAN, split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
    assert data.source_of(data.DATASETS.get("fmnist"), "") == (data.IDX, str(DEBIAN))
    test = data.load_test_set("fmnist")
    assert test.tensors[0].shape == (10_000, 1, 28, 28)
    # Normalised with Fashion-MNIST's own statistics: about zero mean, unit spread.
    assert abs(float(test.tensors[0].mean())) < 0.05 and 0.9 < float(test.tensors[0].std()) < 1.1


@REAL
def test_the_fedbat_dirichlet_split_of_100_clients():
    """Dirichlet 0.3 with the authors' minimum of 10 samples and self-balancing: 100 clients
    hold the 60,000 images, none with fewer than 10."""
    sizes = [
        len(
            data.load_partition(
                "fmnist",
                p,
                100,
                partitioner="dirichlet",
                alpha=0.3,
                labels_per_client=3,
                seed=1,
                min_partition_size=10,
                self_balancing=True,
            )
        )
        for p in range(100)
    ]
    assert sum(sizes) == 60_000 and min(sizes) >= 10


@pytest.mark.e2e
def test_flwr_run_two_rounds_on_fmnist(tmp_path):
    """dataset=fmnist end to end through flwr run: the real files where installed, else the
    fixture through data-files; 100 partitions, 3 sampled per round, the authors' CNN4."""
    extra = ""
    if not data.has_idx_files(DEBIAN):
        write_fixture(tmp_path / "idx", n_train=600, n_test=100)
        extra = f" data-files='{tmp_path / 'idx'}'"
    code, status, results_dir = launch(
        run_config=f"dataset='fmnist' num-server-rounds=2 fraction-fit=0.03 local-epochs=1 "
        f"batch-size=64 min-available-clients=100 results-dir='{tmp_path}' run-name='fmnist' "
        f"device='cpu'{extra}",
        num_supernodes=100,
        flwr_home=tmp_path / "flwr-home",
        log_path=tmp_path / "run.log",
    )
    assert code == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert status == "finished:completed"
    rows = read_rounds(results_dir / "rounds.csv")
    assert [row["round"] for row in rows] == [0, 1, 2]
    assert all(row["clients"] == 3 for row in rows[1:])
    summary = json.loads((results_dir / "summary.json").read_text())
    assert summary["model"] == "cnn4-fedbat" and summary["num_clients"] == 100
    assert summary["num_params"] == 390_880 + 2 * 480  # weights, BN affine and statistics


def test_files_that_are_not_idx_fail_in_one_line_naming_the_file(tmp_path):
    """data-files with the four IDX names but other content: one line naming the file and the
    key, at start, instead of torchvision's bare assertion."""
    from core.config import ConfigError
    from fl_app.methods import load_config
    from fl_app.server_app import build_strategy

    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        (tmp_path / name).write_bytes(b"not an IDX file")
    raw = {"dataset": "fmnist", "data-files": str(tmp_path), "results-dir": str(tmp_path / "r")}
    with pytest.raises(ConfigError) as err:
        build_strategy(load_config(raw)[0])
    message = str(err.value)
    assert "data-files=" in message and "is not a readable IDX file" in message
    assert str(tmp_path) in message and "\n" not in message
