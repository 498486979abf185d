# The two commands of the README. Both set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-slow test-gpu bench bench-headline lint

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/latentforge run demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# The real-GPU checks (tests/gpu): every family's bf16 + torch.compile training step, sampling,
# encode/decode and a metric update on CUDA.  The explicit -m replaces addopts' -m 'not slow'; without
# a GPU every test is skipped with the reason.
test-gpu: setup
	$(PY) -m pytest -q -m cuda tests/gpu

# Static checks (CI runs them first): ruff lint, ruff formatting, mypy on core and the public APIs
# ([tool.mypy] in pyproject.toml). Every check runs; the target fails if any of them failed.
lint: setup
	@status=0; \
	for check in "ruff check ." "ruff format --check ." "mypy"; do \
		echo "$$ $$check"; \
		$(PY) -m $$check || status=1; \
	done; \
	exit $$status

bench: setup
	$(PY) -m pytest benchmarks -m "slow or not slow" --benchmark-enable --benchmark-json=benchmarks/results.json -q

# The rows of the README's speed table, from one run (about 20 minutes on a 2-core CPU; run it on a
# quiet machine), then the table rewritten from that run's JSON.
bench-headline: setup
	$(PY) -m pytest benchmarks -m headline --benchmark-enable --benchmark-json=benchmarks/headline.json -q
	$(PY) benchmarks/readme_speed.py benchmarks/headline.json README.md
