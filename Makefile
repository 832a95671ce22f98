# The two entry points of the README. Both create or reuse .venv and install what is missing.
PY := .venv/bin/python

.PHONY: setup demo test test-fast bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m certnas.cli demo --out runs/demo

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) -m benchmarks.bench_bounds
