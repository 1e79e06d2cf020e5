# SPDX-License-Identifier: MIT
# Every target bootstraps what it needs: a fresh clone only needs python3 (3.11+) and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint pytest demo bench bench-decision bench-gate bench-adaptive bench-edge bench-soak bench-script clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# uv installs the same packages in a third of pip's time; pip does it where uv is not to
	# be had.
	if $(BIN)/python -m pip install --quiet uv; then \
		$(BIN)/python -m uv pip install --quiet --python $(BIN)/python -e '.[dev,bench,demo]'; \
	else \
		$(BIN)/python -m pip install --quiet --upgrade pip && \
		$(BIN)/python -m pip install --quiet -e '.[dev,bench,demo]'; \
	fi
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check throttle tests benchmarks examples tools
	$(BIN)/ruff format --check throttle tests benchmarks examples tools
	$(BIN)/mypy throttle

# Two passes. First the tests that run in this process (in-process workers included), two
# files at a time. Then the tests that start worker processes and kill workers and servers,
# in two lanes at once (tests/conftest.py, BUSY_TESTS): the ones that keep more than a CPU
# busy one after another in one lane, the rest in the other. The light lane reports as it
# goes, the busy lane's report follows. PYTEST_ARGS="..." runs pytest once with those
# arguments instead.
PROCESS_TESTS := tests/test_faults.py tests/test_load.py tests/test_workers.py \
	tests/test_rabbitmq.py tests/test_cluster_failover.py tests/test_demo.py tests/test_flower.py
PYTEST_ARGS ?=

pytest: $(STAMP)
ifeq ($(strip $(PYTEST_ARGS)),)
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=10 \
		$(addprefix --ignore=,$(PROCESS_TESTS))
	log=$$(mktemp); \
	$(BIN)/python -m pytest --lane busy --durations=10 $(PROCESS_TESTS) >$$log 2>&1 & \
	busy=$$!; \
	$(BIN)/python -m pytest --lane light --durations=10 $(PROCESS_TESTS); light=$$?; \
	wait $$busy; busy=$$?; \
	echo "== the busy lane =="; cat $$log; rm -f $$log; \
	test $$light -eq 0 && test $$busy -eq 0
else
	$(BIN)/python -m pytest $(PYTEST_ARGS)
endif

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

# Instructions Redis executes per admission script call (needs valgrind): for comparing two
# versions of the scripts on a machine whose speed moves too much for timings to.
bench-script: $(STAMP)
	$(BIN)/python benchmarks/script_cost.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
