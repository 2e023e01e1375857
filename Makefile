# The two commands a new user runs: `make demo` and `make test`. Both install what they need first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-tests demo test test-unit lint clean

setup:
	bash scripts/setup.sh

setup-tests:
	bash scripts/setup.sh --tests

demo: setup
	$(PY) scripts/demo.py

test: setup-tests
	$(PY) -m pytest -ra tests

test-unit: setup-tests
	$(PY) -m pytest -ra tests/unit

lint:
	$(VENV)/bin/ruff check orthros_py tests scripts
	$(VENV)/bin/mypy orthros_py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
