# The two commands a new user runs: `make demo` and `make test`. Both install what they need first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-tests demo test test-unit vm vm-down lint clean

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

# The cluster as Vagrant VMs on this machine (builds the box once; see README, "The cluster as VMs").
vm: setup-tests
	bash scripts/vm.sh up

vm-down:
	bash scripts/vm.sh down

lint:
	$(VENV)/bin/ruff check orthros_py tests scripts
	$(VENV)/bin/mypy orthros_py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
