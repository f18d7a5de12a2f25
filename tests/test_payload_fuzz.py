"""Every strategy rejects malformed client payloads with a reason and aggregates the rest.

For each registered method: two real client messages (from its own client, in process) plus 20+
distinct kinds of malformed message. The malformed ones must all be rejected (logged with a
reason), and the new global model must equal the one aggregated from the two valid ones alone.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from fl_app.client_app import client_fn
from fl_app.methods import METHODS, load_config
from fl_app.server_app import build_strategy
from tests.helpers import manager_with
from tools.inprocess import make_contexts

Mutation = Callable[[FitRes], FitRes]


def with_arrays(res: FitRes, arrays: list[np.ndarray]) -> FitRes:
    return FitRes(res.status, ndarrays_to_parameters(arrays), res.num_examples, dict(res.metrics))


def with_tensors(res: FitRes, tensors: list[bytes]) -> FitRes:
    return FitRes(
        res.status, Parameters(tensors, "numpy.ndarray"), res.num_examples, dict(res.metrics)
    )


def map_first(res: FitRes, change: Callable[[np.ndarray], np.ndarray]) -> FitRes:
    arrays = parameters_to_ndarrays(res.parameters)
    return with_arrays(res, [change(arrays[0]), *arrays[1:]])


def first_float(res: FitRes, change: Callable[[np.ndarray], np.ndarray]) -> FitRes:
    arrays = parameters_to_ndarrays(res.parameters)
    index = next(i for i, a in enumerate(arrays) if np.issubdtype(a.dtype, np.floating))
    arrays[index] = change(arrays[index].copy())
    return with_arrays(res, arrays)


def set_value(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def change(array: np.ndarray) -> np.ndarray:
        array.reshape(-1)[0] = value
        return array

    return change


def same_size_other_dtype(array: np.ndarray) -> np.ndarray:
    other = {
        1: np.int8 if array.dtype != np.int8 else np.uint8,
        2: np.int16 if array.dtype != np.int16 else np.float16,
        4: np.int32 if array.dtype != np.int32 else np.float32,
        # a reference header is int64 already: view it as float64
        8: np.int64 if array.dtype != np.int64 else np.float64,
    }[array.dtype.itemsize]
    return array.view(other)


def object_tensor() -> bytes:
    """An .npy whose header claims an object array: np.load refuses it without pickle."""
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += " " * (117 - len(header)) + "\n"  # 10-byte preamble + 118 = 128
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 8


def truncated_tensor(res: FitRes) -> FitRes:
    tensors = list(res.parameters.tensors)
    tensors[0] = tensors[0][: max(len(tensors[0]) - 5, 1)]
    return with_tensors(res, tensors)


def metrics_without_partition(res: FitRes) -> FitRes:
    metrics = {k: v for k, v in res.metrics.items() if k != "partition-id"}
    return FitRes(res.status, res.parameters, res.num_examples, metrics)


def with_metric(key: str, value) -> Mutation:
    return lambda res: FitRes(
        res.status, res.parameters, res.num_examples, {**res.metrics, key: value}
    )


def with_examples(count: int) -> Mutation:
    return lambda res: FitRes(res.status, res.parameters, count, dict(res.metrics))


MUTATIONS: dict[str, Mutation] = {
    "garbage bytes": lambda r: with_tensors(r, [b"garbage", *r.parameters.tensors[1:]]),
    "no tensors": lambda r: with_tensors(r, []),
    "object dtype header": lambda r: with_tensors(r, [object_tensor(), *r.parameters.tensors[1:]]),
    "truncated tensor bytes": truncated_tensor,
    # Bytes after a valid array's data would be counted as uplink and inflate the run's bpp.
    "trailing bytes after a valid tensor": lambda r: with_tensors(
        r, [r.parameters.tensors[0] + b"\0" * 64, *r.parameters.tensors[1:]]
    ),
    # Refused by their count, before any of them is decoded.
    "hundreds of extra arrays": lambda r: with_tensors(
        r, [*r.parameters.tensors, *([b"not an array"] * 300)]
    ),
    "one array dropped": lambda r: with_arrays(r, parameters_to_ndarrays(r.parameters)[:-1]),
    "extra array": lambda r: with_arrays(
        r, [*parameters_to_ndarrays(r.parameters), np.zeros(3, np.float32)]
    ),
    "arrays reversed": lambda r: with_arrays(r, parameters_to_ndarrays(r.parameters)[::-1]),
    "first array one short": lambda r: map_first(r, lambda a: a.reshape(-1)[:-1]),
    "first array one long": lambda r: map_first(
        r, lambda a: np.concatenate([a.reshape(-1), a.reshape(-1)[:1]])
    ),
    "first array empty": lambda r: map_first(r, lambda a: a.reshape(-1)[:0]),
    "first array as 0-d": lambda r: map_first(r, lambda a: np.asarray(a.reshape(-1)[0])),
    "first array other dtype": lambda r: map_first(r, same_size_other_dtype),
    "first array as strings": lambda r: map_first(r, lambda a: np.array(["x"] * a.size)),
    "first array complex": lambda r: map_first(r, lambda a: a.astype(np.complex64)),
    "NaN in a float array": lambda r: first_float(r, set_value(np.nan)),
    "inf in a float array": lambda r: first_float(r, set_value(np.inf)),
    "all arrays empty": lambda r: with_arrays(
        r, [a.reshape(-1)[:0] for a in parameters_to_ndarrays(r.parameters)]
    ),
    "zero examples": with_examples(0),
    "negative examples": with_examples(-5),
    "no partition id": metrics_without_partition,
    "partition id as text": with_metric("partition-id", "3"),
    "partition id as bool": with_metric("partition-id", True),
}


def valid_results(name: str, tmp_path) -> tuple[dict, list[tuple[object, FitIns]], list[FitRes]]:
    raw = {
        "strategy": name,
        "device": "cpu",
        "local-epochs": 1,
        "partitioner": "iid",
        "min-available-clients": 1,
        "results-dir": str(tmp_path),
        "checkpoint": False,
    }
    strategy = build_strategy(load_config(raw)[0])
    manager = manager_with(2)
    instructions = strategy.configure_fit(1, Parameters([], ""), manager)
    contexts = make_contexts(raw, 2)
    results = [
        client_fn(ctx).fit(ins) for ctx, (_, ins) in zip(contexts, instructions, strict=True)
    ]
    assert all(res.status.code == Code.OK for res in results)
    return raw, instructions, results


def aggregated(raw: dict, instructions, results: list[FitRes], extra: list[FitRes]):
    strategy = build_strategy(load_config(raw)[0])
    strategy.configure_fit(1, Parameters([], ""), manager_with(2))
    proxies = [proxy for proxy, _ in instructions]
    pairs = list(zip(proxies, results, strict=True))
    pairs += [(proxies[0], res) for res in extra]
    strategy.aggregate_fit(1, pairs, [])
    return strategy


def test_at_least_twenty_kinds_of_malformed_payload():
    assert len(MUTATIONS) >= 20


@pytest.mark.parametrize("name", METHODS.names())
def test_every_strategy_rejects_malformed_payloads(name, tmp_path, caplog):
    raw, instructions, results = valid_results(name, tmp_path)
    clean = aggregated(raw, instructions, results, [])
    bad = {kind: mutate(results[0]) for kind, mutate in MUTATIONS.items()}
    dirty = aggregated(raw, instructions, results, list(bad.values()))
    assert dirty.traffic[1].rejected == len(bad), [
        r.getMessage() for r in caplog.records if "rejected" in r.getMessage()
    ]
    reasons = [r.getMessage() for r in caplog.records if "rejected payload" in r.getMessage()]
    assert len(reasons) == len(bad) and all(": " in reason for reason in reasons)
    for got, want in zip(dirty.global_state, clean.global_state, strict=True):
        np.testing.assert_array_equal(got, want)
        assert np.all(np.isfinite(got))


def test_object_tensor_is_refused_by_numpy_without_pickle():
    assert len(object_tensor()) == 128 + 8
    with pytest.raises(ValueError, match="pickle"):
        np.load(io.BytesIO(object_tensor()), allow_pickle=False)
