# hermes-actors: every target sets up what it needs first, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint unit bench bench-smoke clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the main job: 64 RL-style trajectories through execute_batch on the local backend.
demo: $(STAMP)
	TERMINAL_ENV=local $(BIN)/python examples/rl_batch.py

## Lint, type-check, then the whole test suite.
test: lint unit

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest

## Full benchmarks (not part of CI): writes bench/results/latest.md and a chart.
bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
