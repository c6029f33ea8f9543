# Two commands do all the set-up: `make run` (the main job) and `make test`.
# TORCH_SPEC is overridable: a GPU user sets e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.cxrcf-installed

# Ray's ports listen on every interface, so its token auth stays on (token in ~/.ray/auth_token, 0600)
export RAY_AUTH_MODE ?= token
export RAY_USAGE_STATS_ENABLED ?= 0
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1
export PYTHONUNBUFFERED ?= 1

.PHONY: install run test serve bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned, so that pip takes the local CPU wheel instead of a multi-GB CUDA build
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m pipelines.main

test: $(STAMP)
	RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2 $(BIN)/python -m pytest -q tests

serve: $(STAMP)
	$(BIN)/cxrcf serve

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

lint: $(STAMP)
	$(BIN)/ruff check cxrcf store training serving pipelines benchmarks tests

clean:
	rm -rf artifacts mlruns.db mlartifacts .pytest_cache
