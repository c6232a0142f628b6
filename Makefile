# kubetask developer commands. Every target installs what it needs; `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Where `make dev` keeps its local cluster (certificates, etcd data, logs, kubeconfig).
CLUSTER_DIR ?= $(HOME)/.local/state/kubetask/dev-cluster
# pytest arguments, e.g. `make test PYTEST_ARGS="-k retries -x"`.
PYTEST_ARGS ?=
# `kubetask bench` arguments, e.g. `make bench BENCH_ARGS="--only latency,backlog --json"`.
BENCH_ARGS ?=

.PHONY: help install lint test unit integration dev down crds bench clean

help:
	@echo "make install   venv in $(VENV), Python deps, control-plane binaries (cached, idempotent)"
	@echo "make dev       local cluster + CRDs + operator + example worker, then run an example task"
	@echo "make down      stop what make dev started"
	@echo "make test      lint, then unit and integration tests against a local control plane"
	@echo "make lint      ruff, mypy --strict, import-linter"
	@echo "make crds      regenerate crds/ from the API models"
	@echo "make bench     kubetask bench on a throwaway local cluster (BENCH_ARGS=...)"

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

# A cluster of its own in a temporary directory, so that nothing else running on it skews the
# numbers. The benchmark runs in the background of this shell so that the EXIT trap, which also
# runs on Ctrl-C and SIGTERM, can stop it (it then stops its own processes) before the cluster.
bench: install
	@dir=$$(mktemp -d /tmp/bench-XXXXXX); bench=; \
	trap '[ -z "$$bench" ] || { kill -TERM $$bench 2>/dev/null; wait $$bench; }; \
	      $(BIN)/kubetask cluster down --dir "$$dir/cluster" >/dev/null; rm -rf "$$dir"' EXIT; \
	trap 'exit 130' INT; trap 'exit 143' TERM; \
	$(BIN)/kubetask cluster up --dir "$$dir/cluster" >/dev/null && \
	eval "$$($(BIN)/kubetask cluster env --dir "$$dir/cluster")" && \
	kubectl apply -f crds/ >/dev/null && \
	kubectl wait --for=condition=Established --timeout=60s crd --all >/dev/null && \
	{ $(BIN)/kubetask bench $(BENCH_ARGS) & bench=$$!; wait $$bench; }

clean: down
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
