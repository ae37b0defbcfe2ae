# Two set-up commands for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# Keeps every install on the local CPU build of torch: never pull a CUDA build here.
CONSTRAINTS := -c constraints.txt
STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint format bench bench-quick label install-peer clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(CONSTRAINTS) torch==2.13.0

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -q $(CONSTRAINTS) -e '.[dev]'
	touch $@

$(VENV)/.installed-peer: $(STAMP)
	$(PIP) install -q $(CONSTRAINTS) -e '.[dev,peer]'
	touch $@

demo: $(STAMP)
	$(BIN)/rlhf loop --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

# Benchmarks against the peer (TRL), installed in its own extra.
bench: $(VENV)/.installed-peer
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

bench-quick: $(VENV)/.installed-peer
	for b in benchmarks/*.py; do $(BIN)/python $$b --quick || exit 1; done

label: $(STAMP)
	$(BIN)/rlhf label serve

clean:
	rm -rf runs .pytest_cache .ruff_cache
