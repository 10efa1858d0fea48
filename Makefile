# csm-dataprep: `make demo` and `make test` set everything up themselves on a fresh Debian + Python 3.11.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBIAN_PACKAGES := ffmpeg espeak-ng chromium
OFFLINE_MODELS ?= models/offline
PYTEST_ARGS ?=

.PHONY: setup sysdeps demo test test-fast bench lint lock models-offline clean serve stop

setup: sysdeps $(VENV)/.installed

# Debian packages: ffmpeg decodes every format, espeak-ng speaks the demo and test dialogues, chromium
# drives the Prefect UI test (through Python playwright; `playwright install` is never run).
sysdeps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; fi

# The virtualenv, with the exact versions of requirements.lock (torch 2.8 from PyPI, as whisperX pins it).
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "uv==$(UV_VERSION)"
	$(BIN)/uv pip install -q --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	touch $@

# Regenerate the lock after changing pyproject.toml's dependencies.
lock:
	$(BIN)/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 -o requirements.lock

$(OFFLINE_MODELS)/config.yaml: | setup
	$(BIN)/csm-dataprep models offline $(OFFLINE_MODELS)

models-offline: $(OFFLINE_MODELS)/config.yaml

# The main job on embedded defaults (local Prefect with SQLite, local disk): a generated two-speaker
# dialogue -> data/demo. Hub models when the hub is reachable and HF_TOKEN is set, else the offline set.
demo: setup
	$(BIN)/python -m tasks.synth data/demo-input/dialogue.mp3 --repeat 2
	@if [ -n "$$HF_TOKEN" ] && $(BIN)/csm-dataprep models hub; then \
	  echo "model hub reachable: using the production models"; cfg=""; \
	else \
	  echo "no model hub (or no HF_TOKEN): using the offline model set in $(OFFLINE_MODELS)"; \
	  $(MAKE) --no-print-directory models-offline; cfg="--config $(OFFLINE_MODELS)/config.yaml"; \
	fi; \
	$(BIN)/csm-dataprep ingest data/demo-input --out data --dataset demo $$cfg --overwrite

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m bench

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf data models/offline .pytest_cache

# --- Local Prefect stack -------------------------------------------------------------------------------
# `make serve`: a Prefect server (SQLite under .prefect/, http://$(SERVE_HOST):$(SERVE_PORT)), the process
# work pools, the deployments of prefect.yaml (`prefect deploy --all`) and one worker per pool, all in the
# background with their pid files in .prefect/run/ and logs in .prefect/logs/. `make stop` stops exactly
# those processes. Models: the hub models when HF_TOKEN is set and the hub reachable, else the offline set
# (workers get CSM_INGEST_CONFIG=$(OFFLINE_MODELS)/config.yaml, and train/csm gets configs/train-tiny.yaml
# as its `config`). SERVE_TRAIN_CONFIG=FILE.yaml sets train/csm's `config` in either case.
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 4210
SERVE_POOLS ?= csm-cpu csm-gpu
SERVE_TRAIN_CONFIG ?=
SERVE_TRAIN_CONFIG_OFFLINE ?= configs/train-tiny.yaml
SERVE_DIR := $(CURDIR)/.prefect
SERVE_ENV := PREFECT_HOME=$(SERVE_DIR) PREFECT_API_URL=http://$(SERVE_HOST):$(SERVE_PORT)/api \
  PREFECT_SERVER_ANALYTICS_ENABLED=false
# true if the pid file $(1) names a live prefect process
alive = { [ -s $(1) ] && kill -0 $$(cat $(1)) 2>/dev/null && grep -qa prefect /proc/$$(cat $(1))/cmdline; }

serve: setup
	@mkdir -p $(SERVE_DIR)/run $(SERVE_DIR)/logs
	@if [ -n "$$HF_TOKEN" ] && $(BIN)/csm-dataprep models hub >/dev/null; then \
	  echo "model hub reachable: workers use the production models"; cfg=""; tcfg="$(SERVE_TRAIN_CONFIG)"; \
	else \
	  echo "no model hub (or no HF_TOKEN): workers use the offline model set in $(OFFLINE_MODELS)"; \
	  $(MAKE) --no-print-directory models-offline >$(SERVE_DIR)/logs/models.log 2>&1 || { tail -20 $(SERVE_DIR)/logs/models.log; exit 1; }; cfg="$(CURDIR)/$(OFFLINE_MODELS)/config.yaml"; \
	  tcfg="$(or $(SERVE_TRAIN_CONFIG),$(wildcard $(SERVE_TRAIN_CONFIG_OFFLINE)))"; \
	fi; \
	export $(SERVE_ENV); \
	if $(call alive,$(SERVE_DIR)/run/server.pid); then echo "server already running (pid $$(cat $(SERVE_DIR)/run/server.pid))"; \
	else \
	  setsid nohup $(BIN)/prefect server start --host $(SERVE_HOST) --port $(SERVE_PORT) \
	    >$(SERVE_DIR)/logs/server.log 2>&1 </dev/null & echo $$! >$(SERVE_DIR)/run/server.pid; \
	fi; \
	$(BIN)/python -m flows.serve wait --timeout 180 || { tail -30 $(SERVE_DIR)/logs/server.log; exit 1; }; \
	for pool in $(SERVE_POOLS); do \
	  $(BIN)/prefect work-pool inspect $$pool >/dev/null 2>&1 || $(BIN)/prefect work-pool create $$pool --type process >/dev/null; \
	done; \
	$(BIN)/prefect --no-prompt deploy --all >$(SERVE_DIR)/logs/deploy.log 2>&1 || { tail -30 $(SERVE_DIR)/logs/deploy.log; exit 1; }; \
	echo "deployed: ingest/podcasts ingest/files ingest/partition train/csm (log: .prefect/logs/deploy.log)"; \
	if [ -n "$$tcfg" ]; then $(BIN)/python -m flows.serve set-config train/csm $$tcfg; fi; \
	for pool in $(SERVE_POOLS); do \
	  pidf=$(SERVE_DIR)/run/worker-$$pool.pid; \
	  if $(call alive,$$pidf); then echo "worker for $$pool already running (pid $$(cat $$pidf))"; continue; fi; \
	  CSM_INGEST_CONFIG="$$cfg" setsid nohup $(BIN)/prefect worker start --pool $$pool --name local-$$pool \
	    >$(SERVE_DIR)/logs/worker-$$pool.log 2>&1 </dev/null & echo $$! >$$pidf; \
	  echo "worker for $$pool started (log: .prefect/logs/worker-$$pool.log)"; \
	done; \
	echo "Prefect UI: http://$(SERVE_HOST):$(SERVE_PORT)  (make stop to stop it all)"

# Workers first (all at once), then the server. A worker's graceful stop can take a while: after 15 s its
# process group gets SIGKILL.
stop:
	@for group in "$(SERVE_DIR)/run/worker-*.pid" "$(SERVE_DIR)/run/server.pid"; do \
	  pids=""; \
	  for f in $$group; do \
	    [ -e "$$f" ] || continue; \
	    if $(call alive,$$f); then pid=$$(cat $$f); echo "stopping $$(basename $$f .pid) (pid $$pid)"; \
	      kill -TERM -- -$$pid 2>/dev/null || kill -TERM $$pid; pids="$$pids $$pid"; fi; \
	    rm -f $$f; \
	  done; \
	  for i in $$(seq 75); do left=""; for p in $$pids; do kill -0 $$p 2>/dev/null && left="$$left $$p"; done; \
	    [ -z "$$left" ] && break; sleep 0.2; done; \
	  for p in $$left; do echo "pid $$p did not stop: SIGKILL"; kill -KILL -- -$$p 2>/dev/null || kill -KILL $$p; done; \
	done; true
