# SPDX-License-Identifier: MIT
# Every target bootstraps what it needs: a fresh clone only needs python3 (3.11+) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint pytest demo bench bench-decision bench-gate bench-adaptive bench-edge bench-soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench,demo]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check throttle tests benchmarks examples tools
	$(BIN)/ruff format --check throttle tests benchmarks examples tools
	$(BIN)/mypy throttle

# One test file at a time: the fault tests kill workers and servers and count what happens
# meanwhile, and two files at once (PYTEST_ARGS="-n 2 --dist loadfile", about 5.5 minutes
# instead of 10) loads this 2-core machine enough to make some of them fail.
PYTEST_ARGS ?=

pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint pytest

demo: $(STAMP)
	$(BIN)/python -m examples.demo $(if $(FLOWER),--flower) $(DEMO_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/readme.py $(BENCH_ARGS)

bench-decision: $(STAMP)
	$(BIN)/python benchmarks/decision.py $(BENCH_ARGS)

bench-gate: $(STAMP)
	$(BIN)/python benchmarks/gate.py $(BENCH_ARGS)

bench-adaptive: $(STAMP)
	$(BIN)/python benchmarks/adaptive.py $(BENCH_ARGS)

bench-edge: $(STAMP)
	$(BIN)/python benchmarks/edge.py $(BENCH_ARGS)

bench-soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
