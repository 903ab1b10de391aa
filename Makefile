# The two commands of the README: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
PIP = $(VENV)/bin/pip
# eval: the ALS baseline (demo, `towerann eval`); bench: plots and the hnswlib / lancedb peers of `bench ann`.
# `pip install towerann` alone is what a serving machine needs.
EXTRAS ?= test,scann,eval,bench,lancedb,ray

.PHONY: setup demo test lint test-feast mutants redis bench clean grpc

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch is pinned to 2.13.0 (CPU build) in pyproject.toml
	$(PIP) install -q -e '.[$(EXTRAS)]'
	touch $@

demo: setup
	$(VENV)/bin/towerann demo

# Tests use a real Redis server: install Debian's redis-server when it is missing.
redis:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q redis-server; \
	  else echo "redis-server missing: sudo apt-get install -y redis-server"; exit 1; fi; }

# --durations: the slowest tests close the log, for whoever trims the suite to stay within CI's bound.
# Two test processes (pytest-xdist), whole files to each, so a file's module fixtures are built once: on
# 2 cores the suite took 845 s this way against ~1,235 s in one process (its tests wait on servers,
# subprocesses and Redis for much of their time). TEST_JOBS=0 runs it in one process. Tests marked
# `serial` time decisions under a background load of their own, which the other test process would
# add to (a CI run saw three auto builds split 2:1 that way): they run alone, after the rest.
TEST_JOBS ?= 2
test: setup redis
	$(VENV)/bin/pytest -q --durations=40 -n $(TEST_JOBS) --dist loadfile -m "not serial"
	$(VENV)/bin/pytest -q --durations=5 -m serial

# What CI checks besides the tests: lint, format, types, that every mutant still finds its snippet, and that
# docs/benchmarks.md is what its JSON runs say.
lint: setup
	$(VENV)/bin/ruff check src tests tools
	$(VENV)/bin/ruff format --check src tests tools
	$(VENV)/bin/mypy
	$(VENV)/bin/python tools/mutants.py --check
	$(VENV)/bin/python tools/bench_docs.py --check

# Feast pins pandas < 3 and prometheus-client < 0.25: its backend is tested in a venv of its own, where
# the Feast tests run instead of skipping.
FEAST_VENV ?= .venv-feast
test-feast: redis $(FEAST_VENV)/.installed
	$(FEAST_VENV)/bin/pytest -q tests/contracts/test_feast_contract.py tests/integration/test_feast_serving.py

$(FEAST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(FEAST_VENV)
	$(FEAST_VENV)/bin/pip install -q --upgrade pip
	$(FEAST_VENV)/bin/pip install -q -e '.[test,feast]'
	touch $@

# Targeted mutations (tools/mutants.py): each must make the tests fail; run on a copy of the tree.
# --no-baseline: CI runs the whole suite unmutated right after (`make test`), so a broken test fails CI
# there anyway; run `tools/mutants.py` without it to check the selections first. A kill still counts
# only when the killing test passes unmutated (the tool re-runs it). The budget bounds CI's run: a
# mutant not started within it is "not run", which fails the run. One at a time: on CI's 2 cores two at
# a time (--jobs 2) gained nothing, each run taking twice as long (69 mutants: 672 s, against 436-647 s
# for 57-68 one at a time), as the tests' own servers and BLAS keep both cores busy.
MUTANTS_BUDGET_S ?= 900
mutants: setup redis
	$(VENV)/bin/python tools/mutants.py --no-baseline --budget-s $(MUTANTS_BUDGET_S) --timeout 180

# The gRPC modules of towerann.client (towerann_v1_pb2*.py), from src/towerann/client/towerann_v1.proto; they are
# committed, so run this only after changing the .proto (grpcio-tools comes with the test extra).
grpc: setup
	PYTHON=$(VENV)/bin/python sh tools/gen_grpc.sh

clean:
	rm -rf towerann-demo bench-results .pytest_cache
