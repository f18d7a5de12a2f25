"""Tests for fl_app.data: offline digits partitions and Hub datasets via local stand-in files.

Nothing here may touch the network: Hub datasets are replaced by tiny parquet files with the
same columns, read through the same FederatedDataset code path a Hub run uses.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from flwr_datasets import FederatedDataset
from flwr_datasets.common import telemetry
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    PathologicalPartitioner,
)
from PIL import Image
from torch.utils.data import TensorDataset

from fl_app import data

DIGITS_TOTAL = 1797
DIGITS_TEST = 360  # 20% of 1,797, rounded up by the stratified split
DIGITS_TRAIN = DIGITS_TOTAL - DIGITS_TEST


@pytest.fixture(autouse=True)
def _offline_and_fresh(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory):
    """Block telemetry and Hub access, keep HF's cache out of $HOME, start with empty caches."""
    monkeypatch.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(
        datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-cache"
    )
    data.clear_caches()
    yield
    data.clear_caches()


# --------------------------------------------------------------------------- helpers


def _digits(
    partition_id: int,
    num_partitions: int,
    *,
    partitioner: str = "iid",
    alpha: float = 0.5,
    labels_per_client: int = 2,
    seed: int = 0,
) -> TensorDataset:
    return data.load_partition(
        "digits",
        partition_id,
        num_partitions,
        partitioner=partitioner,
        alpha=alpha,
        labels_per_client=labels_per_client,
        seed=seed,
    )


def _all_partitions(num_partitions: int, **kwargs: object) -> list[TensorDataset]:
    return [_digits(p, num_partitions, **kwargs) for p in range(num_partitions)]


def _rows(ds: TensorDataset) -> Counter[tuple[bytes, int]]:
    """Multiset of (pixels, label) rows: equal multisets = same samples, in any order."""
    x, y = ds.tensors
    return Counter((x[i].numpy().tobytes(), int(y[i])) for i in range(len(y)))


def _max_class_share(ds: TensorDataset) -> float:
    labels = ds.tensors[1]
    return float(torch.bincount(labels).max()) / len(labels)


def _raw_rows(pixels: np.ndarray, labels: np.ndarray) -> Counter[tuple[bytes, int]]:
    return Counter((pixels[i].tobytes(), int(labels[i])) for i in range(len(labels)))


def _denormalise(ds: TensorDataset, spec: data.DatasetSpec) -> Counter[tuple[bytes, int]]:
    """Undo the normalisation back to uint8 (C, H, W) so rows can be matched to what was written."""
    x, y = ds.tensors
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    pixels = torch.round((x * std + mean) * 255).to(torch.uint8).numpy()
    return _raw_rows(pixels, y.numpy())


def _write_fake(
    root: Path,
    spec: data.DatasetSpec,
    *,
    n_train: int,
    n_test: int,
    channels: int | None = None,
    train_name: str = "train",
) -> dict:
    """Write a tiny stand-in for a Hub dataset (same columns and features) as parquet files.

    Returns the raw pixels in (N, C, H, W) uint8 and labels per split, to compare against.
    """
    channels = spec.in_channels if channels is None else channels
    rng = np.random.default_rng(123)
    size = spec.image_size
    features = datasets.Features(
        {
            spec.image_column: datasets.Image(),
            spec.label_column: datasets.ClassLabel(num_classes=spec.num_classes),
        }
    )
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, name, n in (("train", train_name, n_train), ("test", "test", n_test)):
        hwc = (n, size, size, channels) if channels > 1 else (n, size, size)
        pixels = rng.integers(0, 256, size=hwc, dtype=np.uint8)
        labels = rng.integers(0, spec.num_classes, size=n)
        ds = datasets.Dataset.from_dict(
            {
                spec.image_column: [Image.fromarray(p) for p in pixels],
                spec.label_column: labels.tolist(),
            },
            features=features,
        )
        ds.to_parquet(str(root / f"{name}.parquet"))
        chw = pixels.transpose(0, 3, 1, 2) if channels > 1 else pixels[:, None]
        written[split] = (np.ascontiguousarray(chw), labels)
    return written


# --------------------------------------------------------------------------- digits


def test_names() -> None:
    assert data.PARTITIONERS == ("iid", "dirichlet", "label-count")
    assert data.DATASETS.names() == [
        "cifar10",
        "cifar100",
        "digits",
        "fmnist",
        "mnist",
        "svhn",
        "tiny-imagenet",
    ]
    spec = data.DATASETS.get("digits")
    assert (spec.num_classes, spec.in_channels, spec.image_size, spec.hf_path) == (10, 1, 8, None)


def test_digits_test_set_is_fixed() -> None:
    first = data.load_test_set("digits")
    x, y = first.tensors
    assert len(first) == DIGITS_TEST
    assert x.shape == (DIGITS_TEST, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and torch.bincount(y).min() >= 30  # stratified: ~36 per class
    _digits(0, 5, partitioner="dirichlet", seed=7)  # a run with another seed changes nothing
    data.clear_caches()
    again = data.load_test_set("digits")
    assert torch.equal(x, again.tensors[0]) and torch.equal(y, again.tensors[1])


def test_digits_iid_partitions() -> None:
    parts = _all_partitions(10, partitioner="iid")
    sizes = [len(p) for p in parts]
    assert sum(sizes) == DIGITS_TRAIN
    assert max(sizes) - min(sizes) <= 1
    for part in parts:
        x, y = part.tensors
        assert x.shape == (len(part), 1, 8, 8) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) <= 9
    assert sum((_rows(p) for p in parts), Counter()) == _rows(_digits(0, 1))
    # Train and test do not overlap.
    assert not set(_rows(_digits(0, 1))) & set(_rows(data.load_test_set("digits")))


def test_digits_normalised() -> None:
    x = _digits(0, 1).tensors[0]
    assert abs(float(x.mean())) < 0.1
    assert abs(float(x.std()) - 1.0) < 0.1


def test_dirichlet_skew_and_coverage() -> None:
    whole = _rows(_digits(0, 1))
    skew = {}
    for alpha in (0.1, 100.0):
        parts = _all_partitions(10, partitioner="dirichlet", alpha=alpha, seed=3)
        assert sum((_rows(p) for p in parts), Counter()) == whole  # disjoint and complete
        skew[alpha] = np.mean([_max_class_share(p) for p in parts if len(p)])
    assert skew[100.0] < 0.2  # close to uniform (0.1)
    assert skew[0.1] > skew[100.0] + 0.3


def test_dirichlet_many_clients_low_alpha_does_not_fail() -> None:
    # More clients than a strict minimum size allows: empty partitions instead of an error.
    parts = _all_partitions(100, partitioner="dirichlet", alpha=0.05, seed=1)
    assert sum(len(p) for p in parts) == DIGITS_TRAIN
    assert all(p.tensors[0].shape[1:] == (1, 8, 8) for p in parts)


@pytest.mark.filterwarnings("ignore:Classes.*will NOT be used")  # 5 clients x 2 < 10 classes
@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "label-count"])
def test_same_seed_same_partitions(partitioner: str) -> None:
    first = _digits(2, 5, partitioner=partitioner, seed=11)
    data.clear_caches()  # recompute rather than reading the cache
    again = _digits(2, 5, partitioner=partitioner, seed=11)
    other = _digits(2, 5, partitioner=partitioner, seed=12)
    assert torch.equal(first.tensors[0], again.tensors[0])
    assert torch.equal(first.tensors[1], again.tensors[1])
    same_shape = first.tensors[0].shape == other.tensors[0].shape
    assert not (same_shape and torch.equal(first.tensors[0], other.tensors[0]))


def test_label_count() -> None:
    parts = _all_partitions(10, partitioner="label-count", labels_per_client=2, seed=5)
    assert sum(len(p) for p in parts) <= DIGITS_TRAIN
    for part in parts:
        assert len(part) > 0
        assert len(torch.unique(part.tensors[1])) <= 2
    # With as many clients as classes, every class is used by some client.
    assert set(torch.cat([p.tensors[1] for p in parts]).tolist()) == set(range(10))


def test_repeated_calls_use_the_cache() -> None:
    _digits(0, 4, partitioner="dirichlet")
    before = data._partition_arrays.cache_info().hits
    _digits(0, 4, partitioner="dirichlet")
    _digits(1, 4, partitioner="dirichlet")
    assert data._partition_arrays.cache_info().hits == before + 1
    assert data._local_partitioner.cache_info().currsize == 1  # one partitioner for both ids


def test_make_partitioner_kinds() -> None:
    kwargs = {"label_column": "label", "alpha": 0.5, "labels_per_client": 2, "seed": 0}
    assert isinstance(data.make_partitioner("iid", 3, **kwargs), IidPartitioner)
    assert isinstance(data.make_partitioner("dirichlet", 3, **kwargs), DirichletPartitioner)
    assert isinstance(data.make_partitioner("label-count", 3, **kwargs), PathologicalPartitioner)
    with pytest.raises(ValueError, match="valid choices: iid, dirichlet, label-count"):
        data.make_partitioner("shards", 3, **kwargs)
    with pytest.raises(ValueError, match="alpha"):
        data.make_partitioner("dirichlet", 3, **{**kwargs, "alpha": 0.0})
    with pytest.raises(ValueError, match="num_partitions"):
        data.make_partitioner("iid", 0, **kwargs)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: _digits(0, 4, partitioner="shards"), "valid choices: iid, dirichlet, label-count"),
        (
            lambda: data.load_partition(
                "emnist", 0, 2, partitioner="iid", alpha=1.0, labels_per_client=2, seed=0
            ),
            "valid choices: cifar10, cifar100, digits, fmnist, mnist, svhn, tiny-imagenet",
        ),
        (lambda: data.load_test_set("emnist"), "valid choices: .*digits"),
        (lambda: _digits(4, 4), r"partition_id must be in 0\.\.3"),
        (lambda: _digits(-1, 4), "partition_id"),
        (lambda: _digits(0, 0), "num_partitions must be >= 1"),
        (lambda: _digits(0, 4, partitioner="dirichlet", alpha=0.0), "alpha must be > 0"),
        (lambda: _digits(0, 4, partitioner="label-count", labels_per_client=0), r"1\.\.10"),
        (lambda: _digits(0, 4, partitioner="label-count", labels_per_client=11), r"1\.\.10"),
        (lambda: data.load_test_set("digits", data_files="/tmp"), "takes no data_files"),
    ],
)
def test_bad_inputs(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_unused_arguments_are_not_validated() -> None:
    # An iid run must not fail because of the (unused) Dirichlet/label-count settings.
    assert len(_digits(0, 2, partitioner="iid", alpha=0.0, labels_per_client=0)) > 0


# --------------------------------------------------------------------------- hub datasets


@pytest.mark.parametrize(("name", "channels"), [("cifar10", 3), ("fmnist", 1), ("cifar100", 3)])
def test_local_stand_in(tmp_path: Path, name: str, channels: int) -> None:
    spec = data.DATASETS.get(name)
    written = _write_fake(tmp_path / name, spec, n_train=200, n_test=50)
    files = str(tmp_path / name)

    test = data.load_test_set(name, data_files=files)
    x, y = test.tensors
    assert x.shape == (50, channels, spec.image_size, spec.image_size)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert _denormalise(test, spec) == _raw_rows(*written["test"])  # pixels and labels intact
    assert data.load_test_set(name, data_files=files) is test  # cached

    kinds = {"iid": 4, "dirichlet": 3} if spec.num_classes == 10 else {"iid": 4}
    for partitioner, n in kinds.items():
        parts = [
            data.load_partition(
                name,
                p,
                n,
                partitioner=partitioner,
                alpha=1.0,
                labels_per_client=2,
                seed=0,
                data_files=files,
            )
            for p in range(n)
        ]
        for part in parts:
            assert part.tensors[0].shape[1:] == (channels, spec.image_size, spec.image_size)
            assert part.tensors[0].dtype == torch.float32
        if partitioner == "iid":
            assert [len(p) for p in parts] == [50] * 4
        rows = sum((_denormalise(p, spec) for p in parts), Counter())
        assert rows == _raw_rows(*written["train"])

    # Normalised with the dataset's constants: uniform noise has mean 127.5/255 per channel.
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    expected = ((0.5 - mean) / std).flatten()
    assert torch.allclose(x.mean(dim=(0, 2, 3)), expected, atol=0.05)


def test_local_files_go_through_federated_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict] = []

    class Spy(FederatedDataset):
        def __init__(self, **kwargs: object) -> None:
            calls.append(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(data, "FederatedDataset", Spy)
    spec = data.DATASETS.get("cifar10")
    # Hub-style shard names are accepted too.
    _write_fake(tmp_path, spec, n_train=40, n_test=10, train_name="train-00000-of-00001")
    data.load_partition(
        "cifar10",
        1,
        2,
        partitioner="iid",
        alpha=1.0,
        labels_per_client=2,
        seed=4,
        data_files=str(tmp_path),
    )
    assert calls[0]["dataset"] == "parquet" and calls[0]["seed"] == 4
    assert calls[0]["data_files"] == {
        "train": [str(tmp_path / "train-00000-of-00001.parquet")],
        "test": [str(tmp_path / "test.parquet")],
    }


def test_hub_path_uses_hub_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[dict] = []
    # Without local IDX files (none where this machine's package would put them), fmnist
    # comes from the hub.
    fmnist = data.DATASETS.get("fmnist")
    monkeypatch.setitem(
        data.DATASETS._items,
        "fmnist",
        dataclasses.replace(fmnist, idx_dirs=(str(tmp_path / "none"),)),
    )

    class Blocked(RuntimeError):
        pass

    def spy(**kwargs: object) -> None:
        calls.append(kwargs)
        raise Blocked  # stop before any download

    monkeypatch.setattr(data, "FederatedDataset", spy)
    with pytest.raises(Blocked):
        data.load_partition(
            "svhn", 0, 2, partitioner="label-count", alpha=1.0, labels_per_client=3, seed=9
        )
    assert calls[0]["dataset"] == "ufldl-stanford/svhn"
    assert calls[0]["subset"] == "cropped_digits"
    assert "data_files" not in calls[0]
    assert isinstance(calls[0]["partitioners"]["train"], PathologicalPartitioner)
    with pytest.raises(Blocked):
        data.load_test_set("fmnist")
    assert calls[1]["dataset"] == "zalando-datasets/fashion_mnist"


def test_bad_data_files(tmp_path: Path) -> None:
    spec = data.DATASETS.get("cifar10")
    with pytest.raises(ValueError, match="is not a directory"):
        data.load_test_set("cifar10", data_files=str(tmp_path / "missing"))
    _write_fake(tmp_path, spec, n_train=20, n_test=5)
    (tmp_path / "test.parquet").unlink()
    with pytest.raises(ValueError, match="no 'test' files"):
        data.load_test_set("cifar10", data_files=str(tmp_path))
    (tmp_path / "test.csv").write_text("img,label\n")
    with pytest.raises(ValueError, match="mix formats"):
        data.load_test_set("cifar10", data_files=str(tmp_path))


def test_wrong_channels_rejected(tmp_path: Path) -> None:
    spec = data.DATASETS.get("cifar10")
    _write_fake(tmp_path, spec, n_train=20, n_test=5, channels=1)  # grayscale "cifar10"
    with pytest.raises(ValueError, match=r"expected images of shape \(3, 32, 32\)"):
        data.load_test_set("cifar10", data_files=str(tmp_path))


def test_tiny_imagenet_stand_in_with_grayscale_images(tmp_path: Path) -> None:
    """Tiny-ImageNet's held-out split is 'valid' and a few of its images are grayscale."""
    spec = data.DATASETS.get("tiny-imagenet")
    rng = np.random.default_rng(0)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=200)}
    )
    for split, n in (("train", 12), ("valid", 4)):
        images = [
            Image.fromarray(rng.integers(0, 256, (64, 64, 3) if i % 3 else (64, 64), np.uint8))
            for i in range(n)
        ]
        ds = datasets.Dataset.from_dict(
            {"image": images, "label": rng.integers(0, 200, n).tolist()}, features=features
        )
        ds.to_parquet(str(tmp_path / f"{split}.parquet"))
    test = data.load_test_set("tiny-imagenet", data_files=str(tmp_path))
    assert test.tensors[0].shape == (4, 3, 64, 64)
    # Images 0 and 3 were grayscale: their three channels now carry one picture each.
    raw = test.tensors[0] * torch.tensor(spec.std).view(1, -1, 1, 1) + torch.tensor(spec.mean).view(
        1, -1, 1, 1
    )
    same = [
        torch.allclose(img[0], img[1], atol=1e-5) and torch.allclose(img[1], img[2], atol=1e-5)
        for img in raw
    ]
    assert sum(same) == 2
    part = data.load_partition(
        "tiny-imagenet",
        0,
        2,
        partitioner="iid",
        alpha=1.0,
        labels_per_client=2,
        seed=0,
        data_files=str(tmp_path),
    )
    assert part.tensors[0].shape == (6, 3, 64, 64)


# --------------------------------------------------------------------------- validation split


def _with_validation(
    num_partitions: int, fraction: float, seed: int, partitioner: str = "iid"
) -> tuple[list[TensorDataset], TensorDataset]:
    """Every partition and the validation split of digits for one run."""
    kwargs = {"partitioner": partitioner, "alpha": 0.5, "labels_per_client": 2, "seed": seed}
    parts = [
        data.load_partition("digits", p, num_partitions, validation_fraction=fraction, **kwargs)
        for p in range(num_partitions)
    ]
    return parts, data.load_validation_set("digits", fraction=fraction, seed=seed)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_validation_split_is_disjoint_from_partitions_and_test(partitioner: str) -> None:
    parts, validation = _with_validation(10, 0.1, seed=3, partitioner=partitioner)
    train = _rows(_digits(0, 1))  # the whole training split (no validation carved)
    val_rows = _rows(validation)
    assert len(validation) == round(0.1 * DIGITS_TRAIN)
    # Partitions plus validation are exactly the training split: as multisets, so a sample
    # that were both in a partition and in the validation split would be counted twice.
    assert sum((_rows(p) for p in parts), Counter()) + val_rows == train
    assert not any(set(_rows(p)) & set(val_rows) for p in parts)
    assert not set(val_rows) & set(_rows(data.load_test_set("digits")))
    sizes = data.partition_sizes(
        "digits",
        10,
        partitioner=partitioner,
        alpha=0.5,
        labels_per_client=2,
        seed=3,
        validation_fraction=0.1,
    )
    assert sizes == [len(p) for p in parts]  # the server caps claims at these sizes


def test_validation_split_is_stratified() -> None:
    validation = data.load_validation_set("digits", fraction=0.2, seed=5)
    train_labels = _digits(0, 1).tensors[1]
    train_counts = torch.bincount(train_labels, minlength=10).double()
    val_counts = torch.bincount(validation.tensors[1], minlength=10).double()
    # Stated tolerance: every class within one sample of its share of the training split.
    expected = train_counts * len(validation) / len(train_labels)
    assert float((val_counts - expected).abs().max()) <= 1.0
    # A plain random draw of 287 of 1,437 would miss that bound for some class almost surely.


def test_validation_split_is_seeded() -> None:
    first = _rows(data.load_validation_set("digits", fraction=0.1, seed=11))
    data.clear_caches()  # recompute, not read the cache
    assert _rows(data.load_validation_set("digits", fraction=0.1, seed=11)) == first
    assert _rows(data.load_validation_set("digits", fraction=0.1, seed=12)) != first
    # Off (0) leaves every partition exactly as before the feature existed.
    plain = _digits(1, 4, partitioner="dirichlet", seed=11)
    off = data.load_partition(
        "digits",
        1,
        4,
        partitioner="dirichlet",
        alpha=0.5,
        labels_per_client=2,
        seed=11,
        validation_fraction=0.0,
    )
    assert torch.equal(plain.tensors[0], off.tensors[0])


@pytest.mark.parametrize("fraction", [0.5, -0.1, float("nan")])
def test_validation_fraction_out_of_range(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"validation_fraction must be in \[0, 0.5\)"):
        data.load_validation_set("digits", fraction=fraction, seed=0)
    with pytest.raises(ValueError, match="validation_fraction"):
        data.load_partition(
            "digits",
            0,
            2,
            partitioner="iid",
            alpha=1.0,
            labels_per_client=2,
            seed=0,
            validation_fraction=fraction,
        )
    with pytest.raises(ValueError, match="> 0"):
        data.load_validation_set("digits", fraction=0.0, seed=0)


def test_validation_split_of_local_hub_files(tmp_path: Path) -> None:
    """The FederatedDataset path (hub or local files) carves the same way, after its shuffle."""
    spec = data.DATASETS.get("cifar10")
    written = _write_fake(tmp_path, spec, n_train=200, n_test=50)
    files = str(tmp_path)
    validation = data.load_validation_set("cifar10", fraction=0.2, seed=4, data_files=files)
    parts = [
        data.load_partition(
            "cifar10",
            p,
            3,
            partitioner="dirichlet",
            alpha=1.0,
            labels_per_client=2,
            seed=4,
            data_files=files,
            validation_fraction=0.2,
        )
        for p in range(3)
    ]
    assert len(validation) == 40
    rows = sum((_denormalise(p, spec) for p in parts), Counter())
    assert rows + _denormalise(validation, spec) == _raw_rows(*written["train"])
    test = data.load_test_set("cifar10", data_files=files)
    assert _denormalise(test, spec) == _raw_rows(*written["test"])  # untouched


def test_validation_split_of_idx_files(tmp_path: Path) -> None:
    from tests.test_fmnist import write_fixture

    written = write_fixture(tmp_path / "idx", n_train=100, n_test=20)
    folder = str(tmp_path / "idx")
    spec = data.DATASETS.get("fmnist")
    validation = data.load_validation_set("fmnist", fraction=0.2, seed=1, data_files=folder)
    parts = [
        data.load_partition(
            "fmnist",
            p,
            2,
            partitioner="iid",
            alpha=1.0,
            labels_per_client=2,
            seed=1,
            data_files=folder,
            validation_fraction=0.2,
        )
        for p in range(2)
    ]
    # Balanced labels (10 per class): stratified means exactly 2 of each class.
    assert torch.bincount(validation.tensors[1], minlength=10).tolist() == [2] * 10
    images, labels = written["train"]
    rows = sum((_denormalise(p, spec) for p in parts), Counter()) + _denormalise(validation, spec)
    assert rows == _raw_rows(images[:, None], labels.astype(np.int64))


def test_clients_of_a_run_do_not_train_on_its_validation_split() -> None:
    from flwr.common import Context, RecordDict

    from fl_app.client_app import client_fn

    run_config = {"strategy": "fedavg", "partitioner": "iid", "seed": 2, "validation-fraction": 0.1}
    val_rows = set(_rows(data.load_validation_set("digits", fraction=0.1, seed=2)))
    for partition in range(2):
        context = Context(
            run_id=0,
            node_id=partition + 1,
            node_config={"partition-id": partition, "num-partitions": 2},
            state=RecordDict(),
            run_config=run_config,
        )
        client = client_fn(context)
        train_set = client.numpy_client.train_set  # type: ignore[attr-defined]
        assert not set(_rows(train_set)) & val_rows


def test_data_fraction_keeps_a_seeded_subset_of_each_partition() -> None:
    """client-data-fraction: ceil(f * n) rows of the partition, the same for the same seed,
    different for another, and the server's partition sizes agree with what clients load."""
    args = dict(partitioner="dirichlet", alpha=0.5, labels_per_client=2, seed=3)
    full = data.load_partition("digits", 1, 4, **args)
    part = data.load_partition("digits", 1, 4, **args, data_fraction=0.25)
    n = len(full)
    assert len(part) == int(np.ceil(0.25 * n))
    rows = data.subset_rows(n, 0.25, 3, 1)
    torch.testing.assert_close(part.tensors[0], full.tensors[0][torch.from_numpy(rows)])
    assert np.array_equal(rows, data.subset_rows(n, 0.25, 3, 1))
    assert not np.array_equal(rows, data.subset_rows(n, 0.25, 4, 1))
    sizes = data.partition_sizes("digits", 4, **args, data_fraction=0.25)
    assert sizes[1] == len(part)
    assert len(data.subset_rows(n, 1.0, 3, 1)) == n
    with pytest.raises(ValueError, match="data_fraction"):
        data.load_partition("digits", 1, 4, **args, data_fraction=0.0)
