# The two entry points of the README. Both create or reuse .venv and install what is missing.
PY := .venv/bin/python

.PHONY: setup search test test-fast bench

setup:
	@bash scripts/setup.sh

search: setup
	$(PY) -m certnas.cli search --metric clb --out runs/search-clb --force

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) -m benchmarks.bench_bounds
