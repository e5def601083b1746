# bento-canary: the two front-door commands are `make demo` and `make test`.
SHELL  := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test containers fuzz bench chaos lint fmt clean system-deps loadtest knee

## setup: create .venv, install the project and the system services (idempotent)
setup: $(STAMP) system-deps

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing bento-canary into $(VENV) (first run takes a minute or two)"
	@$(BIN)/python -m pip install -q --upgrade pip 2>&1 | { grep -v '^WARNING: Location' || true; }
	@$(BIN)/python -m pip install -q -e '.[test]' 2>&1 | { grep -v '^WARNING: Location' || true; }
	@$(BIN)/python -c "import torch, bentoml, mlflow, onnxruntime" 
	@touch $(STAMP)

system-deps:
	@bash deploy/system-deps.sh

## demo: train -> register -> export -> build -> serve -> predict, end to end
demo: setup
	@$(BIN)/canary demo

## test: the whole test suite, except the real-engine container tests (`make containers`)
test: setup
	@$(BIN)/python -m pytest -m "not engine"

## containers: images built and run on the real container engine, the compose target on real containers
containers: setup
	@$(BIN)/python -m pytest -m engine

## fuzz: the V2 codec fuzzers at 10,000 seeded examples each (make test runs 2,000) and Schemathesis (minutes)
fuzz: setup
	@CANARY_FUZZ_EXAMPLES=10000 $(BIN)/python -m pytest tests/service/v2/test_fuzz.py tests/service/v2/test_schemathesis.py

## bench: the side-by-side serving benchmark (minutes; not part of make test)
bench: setup
	@$(BIN)/python -m bench

## chaos: fault drills on a local stack of its own under Locust load, one table (minutes; not part of make test)
chaos: setup
	@$(BIN)/python -m deploy.chaos $(if $(ONLY),--only "$(ONLY)")

## loadtest: Locust against the running stack (`canary up`): the web UI on 127.0.0.1:8089, or HEADLESS=1 for
##   reports in .canary/loadtest/<time>/; WORKERS=N (master + N local workers), SLOT=blue|green,
##   SHAPE=step|spike|soak|knee, USERS, DURATION (headless, e.g. 5m)
loadtest: setup
	@$(BIN)/canary loadtest $(if $(WORKERS),--workers $(WORKERS)) $(if $(SLOT),--slot $(SLOT)) \
		$(if $(SHAPE),--shape $(SHAPE)) $(if $(filter-out 0 no false,$(HEADLESS)),--headless) \
		$(if $(USERS),--users $(USERS)) $(if $(DURATION),--duration $(DURATION))

## knee: Locust's knee-finding shape on the path make bench saturates, next to its figure (minutes; after make bench)
knee: setup
	@$(BIN)/python -m bench.knee $(if $(MODEL),--model $(MODEL))

## lint: ruff (lint + format check), mypy on the packages, the import contracts, bandit for security smells
lint: setup
	@$(BIN)/ruff check .
	@$(BIN)/ruff format --check .
	@$(BIN)/mypy
	@$(BIN)/lint-imports --no-cache  # the layering contracts of pyproject.toml [tool.importlinter]
	@$(BIN)/bandit -q -c pyproject.toml -r models service deploy loadtest bench

## fmt: apply ruff's fixes and formatting
fmt: setup
	@$(BIN)/ruff check --fix .
	@$(BIN)/ruff format .

## clean: remove all runtime state (.canary/) and exported Bentos
clean:
	rm -rf .canary bentos/*.bento
