# The two commands of the README. Both set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-slow bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/latentforge run demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) -m pytest benchmarks -m "slow or not slow" --benchmark-enable --benchmark-json=benchmarks/results.json -q
