# Two commands do all set-up on a fresh machine:
#   make demo   install into .venv and run HumanEval with the oracle agent on local sandboxes
#   make test   install everything (incl. Docker engine, bubblewrap, Chromium), run the suite
# Local sandboxes are jailed with bubblewrap: `sudo bash scripts/setup-bubblewrap` (or
# `apt-get install bubblewrap`); without it they run less isolated and say so when they start.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
RESULTS ?= results/humaneval-oracle.jsonl

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.core

demo: $(VENV)/.core
	@command -v bwrap >/dev/null || echo "note: bubblewrap is not installed, local sandboxes" \
		"will not be jailed; run: sudo bash scripts/setup-bubblewrap"
	$(BIN)/sandboxnb run humaneval --agent oracle --runtime local --output $(RESULTS)

lint: $(VENV)/.dev
	$(BIN)/ruff check sandboxnb tests benchmarks

test: $(VENV)/.dev
	bash scripts/setup-docker
	bash scripts/setup-bubblewrap
	bash scripts/setup-browser
	$(BIN)/ruff check sandboxnb tests benchmarks
	$(BIN)/pytest

bench: $(VENV)/.dev
	bash scripts/setup-docker
	$(BIN)/python benchmarks/floors.py
	$(BIN)/python benchmarks/spine_micro.py
	$(BIN)/python benchmarks/pool_rollout.py
	$(BIN)/python benchmarks/humaneval_wall.py
	$(BIN)/python benchmarks/scale_local.py
	$(BIN)/python benchmarks/docker_overhead.py
	$(BIN)/python benchmarks/cloud_acquire_modal.py
	$(BIN)/python benchmarks/cloud_acquire_daytona.py

clean:
	rm -rf $(VENV) results
