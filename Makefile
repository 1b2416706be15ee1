# The README's two commands: `make run` (set up, then the main job) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint
setup:
	bash scripts/setup.sh

run: setup
	$(BIN)/learnopt main

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests benchmarks
