# csm-dataprep: `make demo` and `make test` set everything up themselves on a fresh Debian + Python 3.11.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEBIAN_PACKAGES := ffmpeg espeak-ng
OFFLINE_MODELS ?= models/offline
PYTEST_ARGS ?=

.PHONY: setup sysdeps demo test test-fast lint lock models-offline clean

setup: sysdeps $(VENV)/.installed

# Debian packages: ffmpeg decodes every format, espeak-ng speaks the demo and test dialogues.
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

test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf data models/offline .pytest_cache
