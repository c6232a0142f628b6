# kubetask developer commands. Every target installs what it needs; `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Where `make dev` keeps its local cluster (certificates, etcd data, logs, kubeconfig).
CLUSTER_DIR ?= $(HOME)/.local/state/kubetask/dev-cluster
# pytest arguments, e.g. `make test PYTEST_ARGS="-k retries -x"`.
PYTEST_ARGS ?=

.PHONY: help install lint test unit integration dev down crds bench clean

help:
	@echo "make install   venv in $(VENV), Python deps, control-plane binaries (cached, idempotent)"
	@echo "make dev       local cluster + CRDs + operator + example worker, then run an example task"
	@echo "make down      stop what make dev started"
	@echo "make test      lint, then unit and integration tests against a local control plane"
	@echo "make lint      ruff, mypy --strict, import-linter"
	@echo "make crds      regenerate crds/ from the API models"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed
	bash cli/kubetask_cli/build-control-plane.sh >/dev/null

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: $(VENV)/.installed
	$(BIN)/pytest tests/unit -q $(PYTEST_ARGS)

test: install lint
	$(BIN)/pytest -q $(PYTEST_ARGS)

crds: $(VENV)/.installed
	$(BIN)/kubetask crds --out crds
	$(BIN)/kubetask crds --out charts/kubetask/crds

dev: install
	bash hack/dev.sh "$(CLUSTER_DIR)"

down:
	-bash hack/dev.sh --down "$(CLUSTER_DIR)"

clean: down
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
