# Two entry points a new user needs: `make run` (a local population run) and `make test` (everything CI runs).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
EXAMPLE ?= digits
PYTEST_ARGS ?=

.PHONY: venv run test unit integration e2e lint cluster-build prebuild clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,torch]"
	touch $@

## A population trained locally: examples/$(EXAMPLE) (digits: torch on CPU; quadratic: the PBT paper's toy)
run: venv
	$(VENV)/bin/pbt run examples/$(EXAMPLE)/populationtraining.yaml --fresh

## Kubernetes components for the e2e tests, built once per machine into ~/.cache/pbt-operator
cluster-build:
	hack/testcluster.sh build

## Start the e2e tiers' builds in the background (control plane, Karpenter, Kueue, real node, images):
## they overlap with the venv, lint and the unit tests; each e2e fixture waits for what it needs.
prebuild:
	hack/prebuild.sh start

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

unit: venv
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

integration: venv
	$(PY) -m pytest tests/integration -q $(PYTEST_ARGS)

e2e: prebuild venv
	$(PY) -m pytest tests/e2e -q $(PYTEST_ARGS)

## The whole suite: lint, unit, integration, e2e (what .ci/run calls); the e2e builds run in the background
test: prebuild venv lint
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

clean:
	rm -rf pbt-runs .pytest_cache .mypy_cache .ruff_cache
