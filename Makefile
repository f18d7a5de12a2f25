# The README's two commands. Both create .venv when missing and install the project into it.
#   make run   - the main job: FedBiF through flwr run (offline, digits) beside FedAvg of the same
#                setting (cached per config and code version), results and curves under results/
#   make test  - the whole test suite
# Overrides: make run NUM_SUPERNODES=20 RUN_CONFIG="strategy='fedavg' num-server-rounds=5"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NUM_SUPERNODES ?= 10
RUN_CONFIG ?=
FEDERATION_CONFIG ?=
PYTEST_ARGS ?=
RESULTS_DIR ?= $(CURDIR)/results

export FLWR_HOME := $(CURDIR)/.flwr
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_TELEMETRY_ENABLED := 0
export HF_DATASETS_OFFLINE := 1
export HF_HUB_OFFLINE := 1
export MPLCONFIGDIR := $(CURDIR)/.flwr/mplconfig

.PHONY: run test lint install clean gpu-check

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m tools.main_job --num-supernodes $(NUM_SUPERNODES) \
		--results-dir "$(RESULTS_DIR)" --run-config "$(RUN_CONFIG)" \
		$(if $(FEDERATION_CONFIG),--federation-config "$(FEDERATION_CONFIG)") \
		--log $(CURDIR)/.flwr/last-run.log

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

# CUDA tests, one flwr run per seed method on CUDA, resnet18 methods benchmark: one table;
# non-zero on any failure, exit 0 with a message on a machine without CUDA (tools/gpu_check.py)
gpu-check: $(VENV)/.installed
	$(PY) -m tools.gpu_check $(GPU_CHECK_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf .flwr results .pytest_cache
