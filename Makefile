# Two commands do all the set-up on a fresh machine: `make run` (main job) and `make test` (tests).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.tadq-installed

.PHONY: setup run test test-slow quality bench bench-report bench-perf clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0   # the CPU build; installed first so nothing pulls a CUDA torch
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/tadq run

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/reconstruction_budget.py

bench-report: $(STAMP)
	$(BIN)/tadq bench --quick --threads 1 --out runs/bench --models-dir runs/main/models

bench-perf: $(STAMP)
	$(BIN)/python benchmarks/perf.py --threads 1

.PHONY: bench-speed
bench-speed: $(STAMP)   # FP fp32/bf16 vs fake-quant vs int8 on the shipped model (docs/backends.md)
	$(BIN)/python benchmarks/speed.py --threads 1

.PHONY: browser
browser:   # Debian's Chromium, for the test that renders the bench report headless (skipped without it)
	apt-get install -y chromium || echo "could not install chromium: the report test checks the HTML structure only"

quality: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf runs .cache
