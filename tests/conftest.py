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


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        if item.path.name in E2E_MODULES:
            item.add_marker(pytest.mark.e2e)
