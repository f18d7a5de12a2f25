"""What needs a GPU: device selection, every method's client on CUDA, clients sharing a GPU.

The ``cuda`` tests skip without CUDA; ``make gpu-check`` (``tools.gpu_check``) runs them with
``-m cuda`` on a GPU machine, beside one ``flwr run`` per seed method and the resnet18 benchmark.
The INT8 kernel tests of LBI-FL are in ``tests/test_int8_matmul.py``. The last test checks what
``make gpu-check`` does on a machine without CUDA.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.torch_utils import select_device
from fl_app.client_app import client_fn
from fl_app.methods import METHODS
from tools.gpu_check import SKIP_MESSAGE
from tools.inprocess import run_inprocess
from tools.launch import launch

ROOT = Path(__file__).resolve().parent.parent
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TINY = {
    "dataset": "digits",
    "device": "cuda",
    "partitioner": "iid",
    "num-server-rounds": 1,
    "local-epochs": 1,
    "min-available-clients": 2,
    "checkpoint": False,
}


@pytest.mark.cuda
@needs_cuda
def test_device_selection_picks_cuda():
    assert select_device("auto").type == "cuda"
    assert select_device("cuda").type == "cuda"
    assert select_device("cpu").type == "cpu"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_fits_on_cuda(tmp_path, method):
    devices: list[str] = []

    def on_cuda(context):
        client = client_fn(context)
        model = client.numpy_client.model  # type: ignore[attr-defined]
        devices.extend({p.device.type for p in model.parameters()})
        return client

    strategy = run_inprocess(
        {**TINY, "strategy": method, "results-dir": str(tmp_path)}, 2, client_fn=on_cuda
    )
    assert devices and set(devices) == {"cuda"}
    assert strategy.history[-1]["clients"] == 2
    assert all(torch.isfinite(torch.as_tensor(a)).all() for a in strategy.global_state)


@pytest.mark.cuda
@pytest.mark.slow
@needs_cuda
def test_fractional_gpus_put_several_clients_on_one_gpu(tmp_path):
    """Four clients at 0.25 GPU each share the one GPU; with device='cuda' a client that saw
    no GPU would fail the run."""
    code, status, results_dir = launch(
        run_config=f"strategy='fedavg' device='cuda' num-server-rounds=2 min-available-clients=4 "
        f"results-dir='{tmp_path}' run-name='gpus'",
        num_supernodes=4,
        federation_config="num-supernodes=4 client-resources-num-cpus=1 "
        "client-resources-num-gpus=0.25",
        flwr_home=tmp_path / "home",
        log_path=tmp_path / "run.log",
    )
    assert code == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert status == "finished:completed" and results_dir is not None
    summary = json.loads((results_dir / "summary.json").read_text())
    assert summary["completed"] and summary["num_clients"] == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_check_says_it_is_skipped_without_cuda():
    done = subprocess.run(
        [sys.executable, "-m", "tools.gpu_check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == SKIP_MESSAGE
