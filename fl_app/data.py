"""Datasets, federated partitions and their conversion to tensors.

Every client asks for its slice of the training data once per round, and the server evaluates
on one fixed held-out split. Both come back as ``TensorDataset``s of normalised float32 images
``(N, C, H, W)`` and int64 labels ``(N,)``, so training loops never run per-sample transforms.

Where the data comes from, in this order:

* ``digits`` is built from scikit-learn and works offline; it is the default.
* ``fmnist`` and ``mnist`` are read from the original IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
  optionally ``.gz``) with torchvision's IDX reader: from the ``data_files`` folder when it holds
  them, else from the folder an OS package installs them in (Debian/Ubuntu:
  ``apt-get install dataset-fashion-mnist`` -> ``/usr/share/datasets/fashion-mnist``).
* Every other case goes through ``flwr_datasets.FederatedDataset``: from the Hugging Face Hub
  (network needed), or, when ``data_files`` is set, from local files with the Hub's columns.

Built-in and IDX data are partitioned in memory by the same flwr-datasets partitioners
(``partitioner.dataset = ...``) after a shuffle with the run seed, as ``FederatedDataset`` does.

Validation split (``validation_fraction`` > 0): a seeded, stratified share of the *training* split
is set aside before partitioning (``carve_validation``), so no client trains on it and the test
split is never touched; settings are chosen on it (``tools.experiment``'s ``[tune]``), and the
test split only reports. It depends on the run seed, the fraction and the data only (not on the
partitioner), so clients and server carve the same samples whatever each of them loads.

``data_files`` convention for Hub-format files: a directory that holds the train split as
``train.<ext>`` (or shards ``train-*.<ext>``) and the test split as ``test.<ext>`` (or
``test-*.<ext>``), with ``<ext>`` one of parquet, arrow, csv, json, jsonl, all files in one
format. A Hub download's ``plain_text/`` (or subset) folder, e.g.
``train-00000-of-00001.parquet``, already has this layout.
"""

from __future__ import annotations

import functools
import gzip
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
)
from torch.utils.data import TensorDataset
from torchvision.datasets.mnist import read_image_file, read_label_file

from core.config import RunConfig
from core.registry import Registry
from core.seeding import derive_seed, numpy_rng

# Partitions are materialised once per process; per-call progress bars only clutter run logs.
datasets.disable_progress_bars()

PARTITIONERS: tuple[str, ...] = ("iid", "dirichlet", "label-count")

# The digits test split never depends on the run seed, so every run is scored on the same images.
_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_FRACTION = 0.2
# The hub/local test split is loaded with this fixed seed for the same reason.
_TEST_SEED = 0
# The validation share is below one half: it is carved from the clients' training data.
MAX_VALIDATION_FRACTION = 0.5
# Salt of the validation carve's random stream (derived from the run seed).
_VALIDATION_SALT = 0x7A11D
# Name of the carved split inside a FederatedDataset; unlike "validation" or "valid", no Hub
# dataset ships a split of this name, so the carve never shadows a real one.
VALIDATION_SPLIT = "commfl-validation"
# File extension -> ``datasets`` packaged builder used for local ``data_files``.
_BUILDERS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
}


@dataclass(frozen=True)
class DatasetSpec:
    """What the rest of the app needs to know about a dataset (shape, classes, where it lives)."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]  # per-channel normalisation, applied after scaling to [0, 1]
    std: tuple[float, ...]
    hf_path: str | None  # Hub id for FederatedDataset; None for digits
    hf_subset: str | None  # Hub subset ("name" in datasets.load_dataset)
    image_column: str
    label_column: str
    test_split: str = "test"
    #: the model a run uses when ``model`` is ``auto`` (what the papers use on this dataset).
    default_model: str = "cnn4-fedbat"
    #: whether the dataset exists as original IDX files (MNIST family), and where OS packages
    #: install them (tried, in order, when ``data_files`` is empty).
    idx: bool = False
    idx_dirs: tuple[str, ...] = ()


DATASETS: Registry[DatasetSpec] = Registry("dataset")

# digits mean/std: load_digits() images / 16 over all pixels of the 1,437-image train split
# (stratified 80/20 split, seed _DIGITS_SPLIT_SEED), numpy .mean()/.std(), rounded to 4 decimals.
DATASETS.add(
    "digits",
    DatasetSpec(
        "digits",
        10,
        1,
        8,
        (0.3055,),
        (0.3764,),
        None,
        None,
        "image",
        "label",
        default_model="digits-cnn-bn",
    ),
)
DATASETS.add(
    "cifar10",
    DatasetSpec(
        "cifar10",
        10,
        3,
        32,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        "uoft-cs/cifar10",
        None,
        "img",
        "label",
        default_model="resnet10",
    ),
)
DATASETS.add(
    "cifar100",
    DatasetSpec(
        "cifar100",
        100,
        3,
        32,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        "uoft-cs/cifar100",
        None,
        "img",
        "fine_label",
        default_model="resnet10",
    ),
)
DATASETS.add(
    "svhn",
    DatasetSpec(
        "svhn",
        10,
        3,
        32,
        (0.4377, 0.4438, 0.4728),
        (0.1980, 0.2010, 0.1970),
        "ufldl-stanford/svhn",
        "cropped_digits",
        "image",
        "label",
    ),
)
DATASETS.add(
    "tiny-imagenet",
    DatasetSpec(
        "tiny-imagenet",
        200,
        3,
        64,
        (0.4802, 0.4481, 0.3975),
        (0.2770, 0.2691, 0.2821),
        "zh-plus/tiny-imagenet",
        None,
        "image",
        "label",
        test_split="valid",
        default_model="resnet18",
    ),
)
DATASETS.add(
    "mnist",
    DatasetSpec(
        "mnist",
        10,
        1,
        28,
        (0.1307,),
        (0.3081,),
        "ylecun/mnist",
        None,
        "image",
        "label",
        idx=True,
        idx_dirs=("/usr/share/datasets/mnist",),
    ),
)
DATASETS.add(
    "fmnist",
    DatasetSpec(
        "fmnist",
        10,
        1,
        28,
        (0.2860,),
        (0.3530,),
        "zalando-datasets/fashion_mnist",
        None,
        "image",
        "label",
        idx=True,
        idx_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
)


# --------------------------------------------------------------------------- partitioners


def make_partitioner(
    kind: str,
    num_partitions: int,
    *,
    label_column: str,
    alpha: float,
    labels_per_client: int,
    seed: int,
    min_partition_size: int = 0,
    self_balancing: bool = False,
) -> Partitioner:
    """Build the flwr-datasets partitioner for ``kind``; arguments it does not use are ignored.

    Only the arguments a kind uses are validated, so e.g. an ``iid`` run is not rejected over an
    unused ``alpha``. ``iid`` has no seed of its own: the dataset is shuffled with the run seed
    before it is cut into contiguous shards.

    Dirichlet: with ``min_partition_size`` > 0 the partitioner redraws (at most 10 times, then
    raises) until every client has that many samples, which small data with many clients and a
    low alpha cannot meet; the default 0 never redraws, so a client may get an empty partition.
    ``self_balancing`` stops giving a class to clients already above the mean partition size.
    The FedBAT authors' ``labeldir`` split is ``min_partition_size=10, self_balancing=True``.
    """
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        if not alpha > 0:  # also rejects NaN
            raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
        if min_partition_size < 0:
            raise ValueError(f"min_partition_size must be >= 0, got {min_partition_size}")
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=label_column,
            alpha=float(alpha),
            min_partition_size=min_partition_size,
            self_balancing=self_balancing,
            seed=seed,
        )
    if kind == "label-count":
        if labels_per_client < 1:
            raise ValueError(f"labels_per_client must be >= 1, got {labels_per_client}")
        # "first-deterministic" gives client i class i % num_classes first, so every class is
        # used when there are at least as many clients as classes; the other classes are random.
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=label_column,
            num_classes_per_partition=labels_per_client,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    raise ValueError(f"unknown partitioner {kind!r}; valid choices: {', '.join(PARTITIONERS)}")


@dataclass(frozen=True)
class Split:
    """How a run cuts the training data: hashable, so partitioners are cached per split."""

    kind: str
    num_partitions: int
    alpha: float
    labels_per_client: int
    seed: int
    min_partition_size: int = 0
    self_balancing: bool = False
    #: share of the training split carved off for validation before partitioning (0 = none).
    validation_fraction: float = 0.0
    #: share of each partition a client trains on (a seeded subset, for quick ablations; 1 = all).
    data_fraction: float = 1.0

    def partitioner(self, label_column: str) -> Partitioner:
        return make_partitioner(
            self.kind,
            self.num_partitions,
            label_column=label_column,
            alpha=self.alpha,
            labels_per_client=self.labels_per_client,
            seed=self.seed,
            min_partition_size=self.min_partition_size,
            self_balancing=self.self_balancing,
        )


def check_validation_fraction(fraction: float) -> float:
    """``fraction`` as a float in [0, 0.5), else ``ValueError``: at one half or more the clients
    would train on less data than the server holds out."""
    fraction = float(fraction)
    if not 0.0 <= fraction < MAX_VALIDATION_FRACTION:  # also rejects NaN
        raise ValueError(
            f"validation_fraction must be in [0, {MAX_VALIDATION_FRACTION:g}), got {fraction}"
        )
    return fraction


def check_data_fraction(fraction: float) -> float:
    """``fraction`` as a float in (0, 1], else ``ValueError``."""
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:  # also rejects NaN
        raise ValueError(f"data_fraction must be in (0, 1], got {fraction}")
    return fraction


def subset_rows(num_rows: int, fraction: float, seed: int, partition_id: int) -> np.ndarray:
    """Sorted rows of a partition's seeded subset: ``ceil(fraction * num_rows)`` of them (all at
    1.0), drawn by the run seed and the partition id, so a run and its server agree on sizes."""
    if fraction >= 1.0:
        return np.arange(num_rows)
    keep = min(num_rows, math.ceil(fraction * num_rows))
    rng = numpy_rng(seed, partition_id, 0xDA7A)
    return np.sort(rng.choice(num_rows, size=keep, replace=False))


def validation_indices(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) row indices of a training split with ``labels``, both sorted.

    scikit-learn's ``train_test_split(stratify=labels)`` keeps every class's share in both
    parts (to within one sample per class), so a validation score is not skewed towards the
    classes a random draw happened to favour; its seed comes from the run seed (same seed, same
    split). Sorting keeps the fit part in the split's own order, so the partitioner's seeded
    shuffle behaves as without a validation split.
    """
    from sklearn.model_selection import train_test_split

    fraction = check_validation_fraction(fraction)
    if fraction == 0.0:
        return np.arange(len(labels)), np.zeros(0, dtype=np.int64)
    try:
        fit, validation = train_test_split(
            np.arange(len(labels)),
            test_size=fraction,
            stratify=labels,
            random_state=derive_seed(seed, _VALIDATION_SALT) % 2**32,
        )
    except ValueError as err:
        err.add_note(
            f"validation_fraction {fraction:g} of {len(labels)} training samples: every class "
            "needs at least 2 samples and the validation split at least one per class"
        )
        raise
    return np.sort(fit), np.sort(validation)


def carve_validation(
    train: datasets.Dataset, label_column: str, fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(what the clients partition, the validation split) of a training ``Dataset``."""
    labels = np.asarray(train.with_format("numpy", columns=[label_column])[label_column])
    fit, validation = validation_indices(labels, fraction, seed)
    return train.select(fit), train.select(validation)


# --------------------------------------------------------------------------- sources

#: where a dataset's data comes from (see the module docstring).
BUILTIN, IDX, FILES, HUB = "builtin", "idx", "files", "hub"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_path(folder: Path, name: str) -> Path | None:
    """The IDX file ``name`` in ``folder``, plain or gzipped, if present."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def has_idx_files(folder: Path) -> bool:
    """Whether ``folder`` holds all four IDX files of an MNIST-family dataset."""
    return folder.is_dir() and all(
        _idx_path(folder, name) is not None for pair in IDX_FILES.values() for name in pair
    )


def source_of(spec: DatasetSpec, data_files: str) -> tuple[str, str]:
    """(kind, folder) of where ``spec``'s data is read from: see the module docstring."""
    if spec.hf_path is None:
        return BUILTIN, ""
    if data_files:
        if spec.idx and has_idx_files(Path(data_files).expanduser()):
            return IDX, str(Path(data_files).expanduser())
        return FILES, data_files
    for folder in spec.idx_dirs if spec.idx else ():
        if has_idx_files(Path(folder)):
            return IDX, folder
    return HUB, ""


def _read_idx(path: Path, reader: Callable[[str], torch.Tensor]) -> np.ndarray:
    """One IDX file through torchvision's reader (it takes plain files: a ``.gz`` is expanded
    into a temporary folder first); a file that is not IDX fails with one line naming it
    (torchvision's reader only asserts)."""
    try:
        if path.suffix != ".gz":
            return reader(str(path)).numpy()
        with tempfile.TemporaryDirectory() as folder:
            plain = Path(folder) / path.stem
            with gzip.open(path, "rb") as source, plain.open("wb") as target:
                shutil.copyfileobj(source, target)
            return reader(str(plain)).numpy()
    except (AssertionError, OSError, EOFError, RuntimeError, ValueError) as err:
        reason = str(err) or type(err).__name__
        raise ValueError(f"{path} is not a readable IDX file ({reason})") from None


def read_idx_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W) uint8, labels (N,) int64) of the ``train`` or ``test`` IDX pair."""
    image_name, label_name = IDX_FILES[split]
    image_path, label_path = _idx_path(folder, image_name), _idx_path(folder, label_name)
    if image_path is None or label_path is None:
        raise ValueError(f"{folder} lacks {image_name}[.gz] or {label_name}[.gz]")
    images = _read_idx(image_path, read_image_file)
    labels = _read_idx(label_path, read_label_file).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{folder}: {images.shape[0]} {split} images but {labels.shape[0]} labels")
    return images, labels


@functools.lru_cache(maxsize=1)
def _digits_splits() -> datasets.DatasetDict:
    """scikit-learn digits as a Dataset (pixels scaled to [0, 1]) with a fixed stratified split."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    features = datasets.Features(
        {
            "image": datasets.Array2D(shape=(8, 8), dtype="float32"),
            "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
        }
    )
    full = datasets.Dataset.from_dict(
        {"image": (raw.images / 16.0).astype(np.float32), "label": raw.target.astype(np.int64)},
        features=features,
    )
    return full.train_test_split(
        test_size=_DIGITS_TEST_FRACTION, seed=_DIGITS_SPLIT_SEED, stratify_by_column="label"
    )


@functools.lru_cache(maxsize=2)
def _idx_splits(dataset: str, folder: str) -> datasets.DatasetDict:
    """The IDX train and test splits of ``dataset`` in ``folder`` as in-memory Datasets."""
    spec = DATASETS.get(dataset)
    splits = {}
    for split in ("train", "test"):
        images, labels = read_idx_split(Path(folder), split)
        side = spec.image_size
        if images.shape[1:] != (side, side):
            raise ValueError(
                f"{dataset}: expected {side}x{side} images in {folder}, got {images.shape[1:]}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise ValueError(f"{dataset}: labels outside 0..{spec.num_classes - 1} in {folder}")
        features = datasets.Features(
            {
                spec.image_column: datasets.Array2D(shape=(side, side), dtype="uint8"),
                spec.label_column: datasets.ClassLabel(num_classes=spec.num_classes),
            }
        )
        splits[split] = datasets.Dataset.from_dict(
            {spec.image_column: images, spec.label_column: labels}, features=features
        )
    return datasets.DatasetDict(splits)


def _local_splits(dataset: str, source: str, folder: str) -> datasets.DatasetDict:
    """Train and test splits of a built-in or IDX dataset (``test`` is the held-out split)."""
    return _digits_splits() if source == BUILTIN else _idx_splits(dataset, folder)


@functools.lru_cache(maxsize=4)
def _local_train(
    dataset: str, source: str, folder: str, fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(the clients' part, the validation split) of a local train split (``carve_validation``)."""
    train = _local_splits(dataset, source, folder)["train"]
    if fraction == 0.0:
        return train, train.select([])
    return carve_validation(train, DATASETS.get(dataset).label_column, fraction, seed)


@functools.lru_cache(maxsize=8)
def _local_partitioner(dataset: str, source: str, folder: str, split: Split) -> Partitioner:
    """A local train split less its validation share, shuffled with the run seed (as
    FederatedDataset does), partitioned."""
    part = split.partitioner(DATASETS.get(dataset).label_column)
    fit, _ = _local_train(dataset, source, folder, split.validation_fraction, split.seed)
    part.dataset = fit.shuffle(seed=split.seed)
    return part


def _local_data_files(spec: DatasetSpec, data_files: str) -> tuple[str, dict[str, list[str]]]:
    """Resolve the ``data_files`` directory into a builder name and per-split file lists."""
    root = Path(data_files).expanduser()
    layout = (
        f"a directory holding train.<ext> (or train-*.<ext>) and {spec.test_split}.<ext> "
        f"(or {spec.test_split}-*.<ext>), <ext> one of {', '.join(_BUILDERS)}"
    )
    if not root.is_dir():
        raise ValueError(f"data_files must be {layout}; {data_files!r} is not a directory")
    files: dict[str, list[str]] = {}
    for split in ("train", spec.test_split):
        found = sorted(
            str(p)
            for p in root.iterdir()
            if p.is_file()
            and p.suffix in _BUILDERS
            and (p.stem == split or p.stem.startswith(f"{split}-"))
        )
        if not found:
            raise ValueError(f"data_files must be {layout}; no {split!r} files in {str(root)!r}")
        files[split] = found
    builders = {_BUILDERS[Path(f).suffix] for split_files in files.values() for f in split_files}
    if len(builders) != 1:
        raise ValueError(
            f"data_files in {str(root)!r} mix formats ({', '.join(sorted(builders))});"
            " keep one format per directory"
        )
    return builders.pop(), files


@functools.lru_cache(maxsize=4)
def _federated_dataset(dataset: str, data_files: str, split: Split) -> FederatedDataset:
    """The one place a FederatedDataset is built, for the Hub and for local ``data_files`` alike.

    The data is loaded here (not lazily on first use) so that a failure is raised, not cached.
    """
    spec = DATASETS.get(dataset)
    part = split.partitioner(spec.label_column)
    # FederatedDataset shuffles every split with the seed, then runs the preprocessor: the carve
    # sees the same shuffled train split in every process of a run.
    extra = (
        {"preprocessor": functools.partial(_carve_preprocessor, spec.label_column, split)}
        if split.validation_fraction > 0
        else {}
    )
    if data_files:
        builder, files = _local_data_files(spec, data_files)
        fds = FederatedDataset(
            dataset=builder,
            partitioners={"train": part},
            seed=split.seed,
            data_files=files,
            **extra,
        )
        fds.partitioners  # noqa: B018 - property access triggers the load
        return fds
    assert spec.hf_path is not None, f"{dataset} has no Hub id"
    fds = FederatedDataset(
        dataset=spec.hf_path,
        subset=spec.hf_subset,
        partitioners={"train": part},
        seed=split.seed,
        **extra,
    )
    try:
        fds.partitioners  # noqa: B018 - property access triggers the download
    except Exception as exc:
        hint = (
            "; on Debian/Ubuntu, apt-get install the IDX files (see fl_app.data)"
            if spec.idx
            else ""
        )
        exc.add_note(
            f"could not load {spec.hf_path!r} from the Hugging Face Hub; without "
            f"network, point the data-files setting at a local copy{hint}"
        )
        raise
    return fds


def _carve_preprocessor(
    label_column: str, split: Split, splits: datasets.DatasetDict
) -> datasets.DatasetDict:
    """FederatedDataset preprocessor: ``train`` less its validation share, which becomes the
    extra split ``VALIDATION_SPLIT``."""
    fit, validation = carve_validation(
        splits["train"], label_column, split.validation_fraction, split.seed
    )
    return datasets.DatasetDict({**splits, "train": fit, VALIDATION_SPLIT: validation})


# --------------------------------------------------------------------------- conversion


def _to_arrays(ds: datasets.Dataset, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Decode a whole split/partition at once into (N, C, H, W) pixels and int64 labels.

    Pixels keep their stored dtype (uint8 for images, float32 for digits) so caches stay small.
    """
    missing = {spec.image_column, spec.label_column} - set(ds.column_names)
    if missing:
        raise ValueError(
            f"{spec.name}: missing column(s) {sorted(missing)}; available: {ds.column_names}"
        )
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    if len(ds) == 0:  # possible with extreme Dirichlet skew
        return np.zeros((0, *shape), dtype=np.uint8), np.zeros(0, dtype=np.int64)
    cols = ds.with_format("numpy", columns=[spec.image_column, spec.label_column])[:]
    images = cols[spec.image_column]
    if images.dtype == object:  # ragged decode: stack, failing loudly on mixed sizes
        try:
            images = np.stack([_with_channels(np.asarray(img), spec.in_channels) for img in images])
        except ValueError as exc:
            raise ValueError(f"{spec.name}: images do not all have the same shape") from exc
    if images.ndim == 3:  # grayscale (N, H, W)
        images = images[:, None, :, :]
    elif images.ndim == 4:  # channel-last (N, H, W, C), as PIL decodes
        images = images.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"{spec.name}: cannot read images of shape {images.shape[1:]}")
    if images.shape[1:] != shape:
        raise ValueError(
            f"{spec.name}: expected images of shape {shape} (C, H, W), got {images.shape[1:]}"
        )
    labels = np.asarray(cols[spec.label_column]).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ValueError(
            f"{spec.name}: labels must lie in 0..{spec.num_classes - 1}, "
            f"found {labels.min()}..{labels.max()}"
        )
    return np.ascontiguousarray(images), labels


def _with_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """A grayscale (H, W) image among RGB ones (Tiny-ImageNet has some) repeated to (H, W, 3)."""
    if image.ndim == 2 and channels == 3:
        return np.repeat(image[:, :, None], 3, axis=2)
    return image


def _to_tensors(images: np.ndarray, labels: np.ndarray, spec: DatasetSpec) -> TensorDataset:
    """Scale to [0, 1] (integer pixels / 255; float pixels are already scaled) and normalise."""
    x = torch.tensor(images, dtype=torch.float32)
    if np.issubdtype(images.dtype, np.integer):
        x /= 255.0
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return TensorDataset((x - mean) / std, torch.tensor(labels, dtype=torch.int64))


# --------------------------------------------------------------------------- public loaders


def _check_data_files(spec: DatasetSpec, data_files: str) -> None:
    if data_files and spec.hf_path is None:
        raise ValueError(f"{spec.name} is built in and takes no data_files (got {data_files!r})")


@functools.lru_cache(maxsize=256)
def _partition_arrays(
    dataset: str, partition_id: int, split: Split, data_files: str
) -> tuple[np.ndarray, np.ndarray]:
    """Decoded pixels of one partition, cached so later rounds skip image decoding."""
    spec = DATASETS.get(dataset)
    source, folder = source_of(spec, data_files)
    if source in (BUILTIN, IDX):
        ds = _local_partitioner(dataset, source, folder, split).load_partition(partition_id)
    else:
        ds = _federated_dataset(dataset, data_files, split).load_partition(partition_id, "train")
    if split.data_fraction < 1.0:
        ds = ds.select(subset_rows(ds.num_rows, split.data_fraction, split.seed, partition_id))
    return _to_arrays(ds, spec)


def _make_split(
    spec: DatasetSpec,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    labels_per_client: int,
    seed: int,
    min_partition_size: int,
    self_balancing: bool,
    validation_fraction: float = 0.0,
    data_fraction: float = 1.0,
) -> Split:
    """The validated ``Split`` of a run (``load_partition`` documents the arguments)."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if partitioner not in PARTITIONERS:
        raise ValueError(
            f"unknown partitioner {partitioner!r}; valid choices: {', '.join(PARTITIONERS)}"
        )
    if partitioner == "label-count" and not 1 <= labels_per_client <= spec.num_classes:
        raise ValueError(
            f"labels_per_client must be in 1..{spec.num_classes} for {spec.name}, "
            f"got {labels_per_client}"
        )
    if partitioner == "dirichlet" and not alpha > 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    return Split(
        partitioner,
        num_partitions,
        float(alpha),
        int(labels_per_client),
        seed,
        int(min_partition_size),
        bool(self_balancing),
        check_validation_fraction(validation_fraction),
        check_data_fraction(data_fraction),
    )


def load_partition(
    dataset: str,
    partition_id: int,
    num_partitions: int,
    *,
    partitioner: str,
    alpha: float,
    labels_per_client: int,
    seed: int,
    data_files: str = "",
    min_partition_size: int = 0,
    self_balancing: bool = False,
    validation_fraction: float = 0.0,
    data_fraction: float = 1.0,
) -> TensorDataset:
    """One client's training data: normalised float32 ``(N, C, H, W)`` images, int64 labels.

    The same ``seed`` gives the same partitions; it seeds the shuffle and the partitioner.
    ``min_partition_size`` and ``self_balancing`` apply to the Dirichlet split
    (``make_partitioner``). ``validation_fraction`` > 0 partitions the training split less the
    validation share that ``load_validation_set`` returns (the run must pass the same value to
    both, or clients train on the server's validation samples). ``data_fraction`` < 1 keeps a
    seeded subset of the partition (``subset_rows``): ablations sized for small machines.
    """
    spec = DATASETS.get(dataset)
    _check_data_files(spec, data_files)
    split = _make_split(
        spec,
        num_partitions,
        partitioner,
        alpha,
        labels_per_client,
        seed,
        min_partition_size,
        self_balancing,
        validation_fraction,
        data_fraction,
    )
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in 0..{num_partitions - 1}, got {partition_id}")
    images, labels = _partition_arrays(dataset, partition_id, split, data_files)
    return _to_tensors(images, labels, spec)


def partition_arguments(cfg: RunConfig) -> dict[str, Any]:
    """The keyword arguments of ``load_partition`` and ``partition_sizes`` that a run config
    decides. The ClientApp trains on the partitions they give and the ServerApp caps example
    counts by their sizes: one mapping, so the two can never partition differently."""
    return {
        "partitioner": cfg.partitioner,
        "alpha": cfg.dirichlet_alpha,
        "labels_per_client": cfg.labels_per_client,
        "seed": cfg.seed,
        "data_files": cfg.data_files,
        "min_partition_size": cfg.dirichlet_min_size,
        "self_balancing": cfg.dirichlet_self_balancing,
        "validation_fraction": cfg.validation_fraction,  # clients never train on validation
        "data_fraction": cfg.client_data_fraction,
    }


def partition_sizes(
    dataset: str,
    num_partitions: int,
    *,
    partitioner: str,
    alpha: float,
    labels_per_client: int,
    seed: int,
    data_files: str = "",
    min_partition_size: int = 0,
    self_balancing: bool = False,
    validation_fraction: float = 0.0,
    data_fraction: float = 1.0,
) -> list[int] | None:
    """Every partition's size (arguments as ``load_partition``), without decoding an image.

    The server caps each client's claimed example count at its partition's size. Only local
    sources (built-in, IDX files) answer; for a hub or file dataset it would mean loading the
    whole training split on the server, so the answer is None (cap by ``max-examples``).
    """
    spec = DATASETS.get(dataset)
    _check_data_files(spec, data_files)
    source, folder = source_of(spec, data_files)
    if source not in (BUILTIN, IDX):
        return None
    split = _make_split(
        spec,
        num_partitions,
        partitioner,
        alpha,
        labels_per_client,
        seed,
        min_partition_size,
        self_balancing,
        validation_fraction,
        data_fraction,
    )
    part = _local_partitioner(dataset, source, folder, split)
    return [
        len(subset_rows(part.load_partition(i).num_rows, split.data_fraction, seed, i))
        for i in range(num_partitions)
    ]


@functools.lru_cache(maxsize=4)
def _test_set(dataset: str, data_files: str) -> TensorDataset:
    spec = DATASETS.get(dataset)
    source, folder = source_of(spec, data_files)
    if source in (BUILTIN, IDX):
        split = _local_splits(dataset, source, folder)["test"]
    else:
        fds = _federated_dataset(dataset, data_files, Split("iid", 1, 1.0, 1, _TEST_SEED))
        split = fds.load_split(spec.test_split)
    return _to_tensors(*_to_arrays(split, spec), spec)


def load_test_set(dataset: str, *, data_files: str = "") -> TensorDataset:
    """The server's held-out test split (same for every run), in the training tensor format.

    The result is cached and shared between callers, who must not modify it in place.
    """
    spec = DATASETS.get(dataset)
    _check_data_files(spec, data_files)
    return _test_set(dataset, data_files)


@functools.lru_cache(maxsize=4)
def _validation_set(dataset: str, data_files: str, fraction: float, seed: int) -> TensorDataset:
    spec = DATASETS.get(dataset)
    source, folder = source_of(spec, data_files)
    if source in (BUILTIN, IDX):
        _, split = _local_train(dataset, source, folder, fraction, seed)
    else:
        # The carve does not depend on the partitioner: one iid partition loads the least.
        whole = Split("iid", 1, 1.0, 1, seed, validation_fraction=fraction)
        split = _federated_dataset(dataset, data_files, whole).load_split(VALIDATION_SPLIT)
    return _to_tensors(*_to_arrays(split, spec), spec)


def load_validation_set(
    dataset: str, *, fraction: float, seed: int, data_files: str = ""
) -> TensorDataset:
    """The validation split of a run (``fraction`` > 0 of its training split, stratified, drawn
    from ``seed``), in the training tensor format: disjoint from every partition
    ``load_partition`` gives for the same ``fraction`` and ``seed``, and from the test split.

    The result is cached and shared between callers, who must not modify it in place.
    """
    spec = DATASETS.get(dataset)
    _check_data_files(spec, data_files)
    fraction = check_validation_fraction(fraction)
    if fraction == 0.0:
        raise ValueError("load_validation_set needs validation_fraction > 0")
    return _validation_set(dataset, data_files, fraction, seed)


def clear_caches() -> None:
    """Drop every cached dataset, partitioner and tensor (tests, or to free memory)."""
    for cached in (
        _digits_splits,
        _idx_splits,
        _local_train,
        _validation_set,
        _local_partitioner,
        _federated_dataset,
        _partition_arrays,
        _test_set,
    ):
        cached.cache_clear()
