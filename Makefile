# The user interface of the repo. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
MODEL ?= green-tint-cpu
COMPOSE := docker compose
# The model ids the orchestrator in compose.yaml registers (the line after each -byocModelID).
MODELS := $(shell sed -n '/- -byocModelID/{n;s/^ *- *//p;}' compose.yaml)
# Builds pick their base (official python image, or one made from Debian packages) and get the
# host's pip CA bundle as a build secret; see scripts/choose-base-image.sh and pip-cert-path.sh.
BUILD_ENV = BASE_IMAGE=$$(scripts/choose-base-image.sh) BUILD_PIP_CERT=$$(scripts/pip-cert-path.sh)

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z_%-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*?## "}; {printf "  %-16s %s\n", $$1, $$2}'

# --- the topology in Docker ------------------------------------------------------------------

up: build ## build what changed, start gateway, orchestrator and processors, wait until healthy
	$(COMPOSE) up -d --wait

down: ## stop and remove the topology
	$(COMPOSE) down

logs: ## print the logs of every service (registration lines, one line per job per hop)
	$(COMPOSE) logs --no-color

ps: ## list the services and their health
	$(COMPOSE) ps

test-job: venv ## send one job through the gateway and check it: make test-job MODEL=grayscale-cpu
	$(PY) scripts/test_byoc_job.py --model $(MODEL)

test-jobs: venv ## the test job for every model the compose topology serves
	@for model in $(MODELS); do $(PY) scripts/test_byoc_job.py --model $$model || exit 1; done

build: docker-ready ## build every image
	$(BUILD_ENV) $(COMPOSE) build

build-%: docker-ready ## build one service's image, e.g. make build-green-tint
	$(BUILD_ENV) $(COMPOSE) build $*

base-image: docker-ready ## build byoc-base:bookworm from Debian packages (hosts with no registry)
	scripts/build-base-image.sh

docker-setup: ## install and start a Docker engine and compose v2 (Debian hosts without one, as root)
	scripts/setup-docker.sh

docker-ready:
	@docker info >/dev/null 2>&1 && $(COMPOSE) version >/dev/null 2>&1 || scripts/setup-docker.sh

docker-test: venv ## end-to-end tests against the compose topology (starts it if needed)
	$(PY) -m pytest tests/docker -m docker $(PYTEST_ARGS)

# --- the same topology as local processes ----------------------------------------------------

up-local: venv ## start the topology as local processes on the same ports (logs in .run/logs/)
	$(PY) scripts/topology.py up

down-local: ## stop the local processes
	$(PY) scripts/topology.py down

serve-%: venv ## run one processor locally, e.g. make serve-green-tint
	$(PY) -m common.serve processors/$*/$(subst -,_,$*).py

# --- development -----------------------------------------------------------------------------

$(VENV)/.installed: pyproject.toml common/requirements.txt common/requirements-media.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed ## create the local virtualenv with runtime and test dependencies

test: venv ## unit and integration tests (real servers on loopback, no Docker)
	$(PY) -m pytest -m "not docker" $(PYTEST_ARGS)

lint: venv ## ruff: lint and formatting check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv ## ruff: fix formatting
	$(VENV)/bin/ruff format .

bench: venv ## run the benchmarks and print their figures
	$(PY) bench/bench_green_tint.py

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache

.PHONY: help up down logs ps test-job test-jobs build base-image docker-setup docker-ready docker-test \
	up-local down-local venv test lint format bench clean
