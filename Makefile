# The README's two commands. Both create .venv when missing and install the project into it.
#   make run   - the main job: FedBiF through flwr run (offline, digits) beside FedAvg of the same
#                setting (cached per config and code version), results and curves under results/
#   make test  - the whole test suite
# Overrides: make run NUM_SUPERNODES=20 RUN_CONFIG="strategy=fedavg num-server-rounds=5"
# `make` alone prints this help and installs nothing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NUM_SUPERNODES ?= 10
RUN_CONFIG ?=
FEDERATION_CONFIG ?=
PYTEST_ARGS ?=
# pytest-xdist workers for make test/check: one per core, at most 4 (each end-to-end run starts
# Ray or SuperNodes); TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
PARALLEL := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)
RESULTS_DIR ?= $(CURDIR)/results

export FLWR_HOME := $(CURDIR)/.flwr
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_TELEMETRY_ENABLED := 0
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export MPLCONFIGDIR := $(CURDIR)/.flwr/mplconfig

.DEFAULT_GOAL := help
.PHONY: help run test check lint install clean gpu-check

help:
	@echo "commfl: communication-efficient federated learning on Flower"
	@echo ""
	@echo "  make run     the main job: FedBiF through flwr run on digits (offline) beside FedAvg"
	@echo "               of the same setting; results and curves under results/ (~3 min)"
	@echo "               e.g. make run RUN_CONFIG=\"strategy=fedbat num-server-rounds=5\""
	@echo "  make test    the whole test suite (what CI runs; ~12 min on 2 cores)"
	@echo "  make check   the quick tier: no end-to-end flwr runs or deployments (~4 min)"
	@echo "  make lint    ruff"
	@echo "  make gpu-check  CUDA tests and a GPU benchmark (exits 0 without CUDA)"
	@echo "  make install    only create .venv and install (first run: several minutes;"
	@echo "               ~6.5 GB, most of it torch's CUDA libraries, also on a CPU machine)"
	@echo "  make clean   remove .flwr, results/ and caches (not .venv)"

$(VENV)/.installed: pyproject.toml
	@echo "installing the project into $(VENV): torch, torchvision, flwr[simulation] (with ray) and"
	@echo "the test tools; several minutes the first time, ~6.5 GB (torch's CUDA libraries come"
	@echo "with it even on a CPU machine)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar off -e ".[dev]" | grep -E "^(Collecting|Successfully)" || true
	@$(PY) -c "import torch, flwr" || { echo "install failed: see the pip output above"; exit 1; }
	@echo "installed: $$(du -sh $(VENV) | cut -f1) in $(VENV)"
	@touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m tools.main_job --num-supernodes $(NUM_SUPERNODES) \
		--results-dir "$(RESULTS_DIR)" --run-config "$(RUN_CONFIG)" \
		$(if $(FEDERATION_CONFIG),--federation-config "$(FEDERATION_CONFIG)") \
		--log $(CURDIR)/.flwr/last-run.log

test: $(VENV)/.installed
	$(PY) -m pytest $(PARALLEL) $(PYTEST_ARGS)

# The inner loop: everything but the end-to-end flwr runs, deployments and long runs.
check: $(VENV)/.installed
	$(PY) -m pytest -q $(PARALLEL) -m "not slow and not deploy and not e2e" $(PYTEST_ARGS)

# CUDA tests, one flwr run per seed method on CUDA, resnet18 methods benchmark: one table;
# non-zero on any failure, exit 0 with a message on a machine without CUDA (tools/gpu_check.py)
gpu-check: $(VENV)/.installed
	$(PY) -m tools.gpu_check $(GPU_CHECK_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf .flwr results .pytest_cache
