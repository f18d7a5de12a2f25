"""Test-wide settings: no network, no telemetry, deterministic CPU runs."""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: modules whose tests start Flower's processes (a SuperLink, Ray, SuperNodes): `make check`
#: leaves them to `make test`.
E2E_MODULES = frozenset({"test_e2e_flwr_run.py", "test_ray_cluster.py", "test_deploy.py"})


def pytest_configure(config):
    """Under pytest-xdist, each worker's torch gets its share of the cores: N workers with
    torch's default of one thread per core would oversubscribe them (see core/torch_utils)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        import torch

        from core.torch_utils import available_cpus

        torch.set_num_threads(max(1, available_cpus() // workers))


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        if item.path.name in E2E_MODULES:
            item.add_marker(pytest.mark.e2e)
        if uses_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


def uses_module_fixture(item) -> bool:
    """Whether ``item`` uses a module-scoped fixture (a deployed federation, a shared run):
    under ``pytest -n N --dist loadgroup`` (``make test``) such tests of a module share one
    worker, so the fixture is built once; every other test goes to whichever worker is free."""
    definitions = item._fixtureinfo.name2fixturedefs.values()
    return any(d.scope == "module" for defs in definitions for d in defs)
