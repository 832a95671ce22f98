# The two entry points of the README. Both create or reuse .venv and install what is missing.
PY := .venv/bin/python

.PHONY: setup search test test-all bench

setup:
	@bash scripts/setup.sh

search: setup
	$(PY) -m certnas.cli search --metric clb --out runs/search-clb --force

# the default suite (under 15 minutes on 2 cores): everything but the tests marked slow.
# tests/verifiers run with certnas blocked (the library stands alone), then the rest.
test: setup
	$(PY) -m pytest -q --durations=15 -m "not slow" -p tests.without_certnas tests/verifiers
	$(PY) -m pytest -q --durations=15 -m "not slow" tests --ignore=tests/verifiers

# what CI runs: every test, the slow ones included
test-all: setup
	$(PY) -m pytest -q --durations=15 -p tests.without_certnas tests/verifiers
	$(PY) -m pytest -q --durations=15 tests --ignore=tests/verifiers

bench: setup
	$(PY) -m benchmarks.bench_bounds
