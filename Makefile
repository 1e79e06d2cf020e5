# SPDX-License-Identifier: MIT
# Every target bootstraps what it needs: a fresh clone only needs python3 (3.11+) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint pytest demo bench bench-decision bench-gate bench-adaptive clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench,demo]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check throttle tests benchmarks examples
	$(BIN)/ruff format --check throttle tests benchmarks examples
	$(BIN)/mypy throttle

pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint pytest

demo: $(STAMP)
	@echo "make demo: the agent-platform demo is not built yet (see the 'Operate it' issue)."

bench: bench-decision bench-gate bench-adaptive

bench-decision: $(STAMP)
	$(BIN)/python benchmarks/decision.py $(BENCH_ARGS)

bench-gate: $(STAMP)
	$(BIN)/python benchmarks/gate.py $(BENCH_ARGS)

bench-adaptive: $(STAMP)
	$(BIN)/python benchmarks/adaptive.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
