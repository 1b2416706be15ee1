# The README's two commands: `make run` (set up, then the main job) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint
setup:
	bash scripts/setup.sh

run: setup
	$(BIN)/learnopt main

# Two test processes: XLA:CPU runs one thread per process here (PJRT_NPROC=1, docs/hangs.md).
test: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: setup
	$(BIN)/ruff check src tests benchmarks
