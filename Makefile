# The lab's entry points. `make lab` and `make test` install whatever they lack.
VENV      := .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
PYTHON    ?= python3
SCENARIO  ?= scenarios/smoke.yaml
PYTEST_ARGS ?=

.PHONY: setup system lab test test-lab bench gate-check lint clean help

help:
	@echo "make lab    bring up the embedded lab and run the smoke scenario suite"
	@echo "make test   run the test suite (what CI runs)"
	@echo "make bench  print bring-up and load-generator figures"
	@echo "make gate-check  5 baseline runs, 10 unchanged and 10 slowed: the gate's counts"
	@echo "make lint   ruff and mypy"
	@echo "make clean  remove leftovers of labs whose owner died"

setup: system $(STAMP)

system:
	@scripts/system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

lab: setup
	$(BIN)/lab run $(SCENARIO)

test: setup
	$(BIN)/pytest -n 2 -p no:cacheprovider $(PYTEST_ARGS)

test-lab: setup
	$(BIN)/pytest -m lab $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m lab.bench

gate-check: setup
	scripts/gate-check $(SCENARIO)

lint: setup
	$(BIN)/ruff check lab tests
	$(BIN)/ruff format --check lab tests
	$(BIN)/mypy

clean: setup
	$(BIN)/lab clean
