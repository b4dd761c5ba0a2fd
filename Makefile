# The two README commands: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck bench-read default-model clean venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## Run everything in one process on the embedded default (no Kafka, no Redis, no GPU).
demo: $(STAMP)
	$(BIN)/userembed demo

## Unit, integration (real redis-server) and end-to-end tests, plus lint and types.
test: $(STAMP)
	$(BIN)/ruff check service models tests
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check service models tests
	$(BIN)/ruff format --check service models tests

typecheck: $(STAMP)
	$(BIN)/mypy

## Read-path benchmark: API over HTTP vs a raw async Redis GET, against a real redis-server.
bench-read: $(STAMP)
	$(BIN)/userembed bench read

## Re-train the committed default model of the demo (models/artifacts, ~75 s on 2 cores).
default-model: $(STAMP)
	rm -rf models/artifacts
	$(BIN)/userembed train --registry models/artifacts --version sum-default-1 --parent none

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
