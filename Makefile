# hermes-actors: every target sets up what it needs first, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo docs test lint unit bwrap reliability bench bench-smoke clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the main job: 64 RL-style trajectories through execute_batch on the local backend.
demo: $(STAMP)
	TERMINAL_ENV=local $(BIN)/python examples/rl_batch.py

## Regenerate docs/profiles.md and docs/troubleshooting.md from the code.
docs: $(STAMP)
	$(BIN)/python -m hermes_actors.cli._docs

## Lint, type-check, then the whole test suite.
test: lint unit

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy

## The isolation cases need bubblewrap: installed here when possible (root and apt-get); else
## they are reported as skipped, with the reason, in pytest's summary (never as failures).
## Two workers (most tests wait on processes, not on a CPU), each taking whole files: a file's
## module fixtures then run once, and its tests never run beside each other. Then the fault
## suite alone: it loads the machine on purpose (a dozen hosts with 50 commands each) and holds
## the runtime to time bounds (all gone within 5 s of a signal), so nothing runs beside it.
unit: $(STAMP) bwrap
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not faults"
	$(BIN)/python -m pytest -m faults

bwrap:
	@command -v bwrap >/dev/null 2>&1 \
	|| { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	     && { echo "installing bubblewrap (apt-get) for the isolation tests"; \
	          apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; } ; } \
	|| echo "bubblewrap is not installed and cannot be installed here (needs root and apt-get): the isolation tests will be skipped"

## The fault suite alone (also part of `make test`), writing its figures to docs/reliability.md.
reliability: $(STAMP) bwrap
	$(BIN)/python -m pytest -m faults --reliability-report=docs/reliability.md

## Full benchmarks (not part of CI): writes bench/results/latest.md and a chart.
bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
