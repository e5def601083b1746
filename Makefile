# bento-canary: the two front-door commands are `make demo` and `make test`.
SHELL  := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench chaos lint fmt clean system-deps

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

## test: the whole test suite
test: setup
	@$(BIN)/python -m pytest

## bench: the side-by-side serving benchmark (minutes; not part of make test)
bench: setup
	@$(BIN)/python -m bench

## chaos: fault drills on a local stack of its own under Locust load, one table (minutes; not part of make test)
chaos: setup
	@$(BIN)/python -m deploy.chaos $(if $(ONLY),--only "$(ONLY)")

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
