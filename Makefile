# Two entry points (see README): `make bench` runs the quick split-MNIST benchmark, `make test` the tests.
# Both create .venv and install what they need; torch/torchvision are pinned here only (the package asks for ranges).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# Data: $BAYESCL_DATA if set, else ../shared/data when it exists, else ./data (fetched on first use).
BAYESCL_DATA ?= $(shell [ -d ../shared/data/MNIST ] && echo ../shared/data || echo data)
export BAYESCL_DATA
STAMP := $(VENV)/.installed
QUICK_STRATEGIES ?= naive joint laplace-kron vcl
QUICK_ARGS ?= --seeds 1 --epochs 1

.PHONY: bench test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench,avalanche]"
	touch $(STAMP)

install: $(STAMP)

bench: $(STAMP)
	$(BIN)/bayescl bench --scenario split-mnist-task --strategy $(QUICK_STRATEGIES) $(QUICK_ARGS) --out benchmarks/results/quick

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
