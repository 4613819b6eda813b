# workorder-operator — every target documented in README.md.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CACHE   ?= $(HOME)/.cache/workorder-operator
PYTHON  ?= python3
# The virtualenv lives outside the repository, one per clone and dependency list: its editable
# install points at this clone, so two clones (or worktrees) never test each other's code.
VENV    := $(CACHE)/venv-$(shell cat pyproject.toml | sha256sum | cut -c1-8)-$(shell echo "$(CURDIR)" | sha256sum | cut -c1-8)
BIN     := $(VENV)/bin
LOCAL   := $(CURDIR)/.local
KUBECONFIG_LOCAL := $(LOCAL)/kubeconfig
CLUSTER ?= local
PYTEST_ARGS ?=
BENCH_ARGS ?=

export WORKORDER_CACHE := $(CACHE)

.PHONY: help venv binaries test unit lint mutation run cluster-up cluster-down crds kind-up test-kind bench demo clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

$(VENV)/.done: pyproject.toml
	@echo ">> creating virtualenv $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.done ## create this clone's virtualenv (once per dependency set) and print where it is
	@# A clone moved on disk gets a new venv; one that somehow points elsewhere is an error, never re-pointed silently.
	@$(BIN)/python -c 'import workorder_operator, pathlib, sys; sys.exit(pathlib.Path(workorder_operator.__file__).resolve().parents[2] != pathlib.Path("$(CURDIR)").resolve())' \
		|| { echo "error: $(VENV) imports workorder_operator from another clone; remove it and run make again" >&2; exit 1; }
	@echo "virtualenv: $(VENV)"

binaries: ## build etcd, kube-apiserver, kube-controller-manager and the Shipwright controller into the cache (once)
	@tools/build-controlplane.sh

lint: venv ## ruff and mypy (strict on the package)
	$(BIN)/ruff check operator tests bench tools
	$(BIN)/ruff format --check operator tests bench tools
	$(BIN)/mypy

unit: venv ## only the fast unit tests (no cluster)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

mutation: venv ## mutation testing of the pure core (slow; MUTATE="lifecycle backoff" for some modules); not part of make test
	PATH=$(BIN):$$PATH $(BIN)/python tools/mutation.py $(MUTATE)

test: venv binaries lint ## the whole suite: set-up, lint, unit and integration tests on a real control plane
	PATH=$(BIN):$$PATH $(BIN)/pytest $(PYTEST_ARGS)

cluster-up: venv binaries ## start the local control plane in the background (idempotent); kubeconfig in .local/kubeconfig
	@$(BIN)/python -m workorder_operator.envtest up $(LOCAL)

cluster-down: venv ## stop the local control plane
	@$(BIN)/python -m workorder_operator.envtest down $(LOCAL)

ifeq ($(CLUSTER),local)
run: cluster-up ## run the operator in the foreground (CLUSTER=current: the current kubeconfig context)
	KUBECONFIG=$(KUBECONFIG_LOCAL) $(BIN)/python -m workorder_operator.envtest crds
	KUBECONFIG=$(KUBECONFIG_LOCAL) $(BIN)/workorder-operator --all-namespaces
else
run: venv
	$(BIN)/python -m workorder_operator.envtest crds --no-shipwright
	$(BIN)/workorder-operator --all-namespaces
endif

kind-up: ## (needs Docker + kind; not on our machines) create a kind cluster and install the CRDs
	kind create cluster --name workorder
	kubectl apply --server-side -f crds/

test-kind: venv ## (needs kind-up) run the same suite against the kind cluster
	TEST_KUBECONFIG=$${KUBECONFIG:-$$HOME/.kube/config} PATH=$(BIN):$$PATH $(BIN)/pytest $(PYTEST_ARGS)

bench: venv binaries ## benchmarks (not part of make test); results under bench/results/
	PATH=$(BIN):$$PATH $(BIN)/python bench/run.py $(BENCH_ARGS)

demo: cluster-up ## a visible end-to-end run (orders, two agents, a retry, an expiry); watch with kubectl get wo -n demo -w
	PATH=$(BIN):$$PATH examples/demo.sh

clean: cluster-down ## remove local state (the cache in ~/.cache/workorder-operator stays)
	rm -rf $(LOCAL)
