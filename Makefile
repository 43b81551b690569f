# Two commands do all set-up on a fresh machine:
#   make demo   the whole fleet in one process, simulated models, nothing to configure
#   make test   unit, integration and end-to-end tests on real Redis and Postgres
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test chaos services lint clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "tierfleet needs Python >= 3.11; set PYTHON=python3.12 (or similar)"; exit 2; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,backends]'
	@touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/tierfleet demo

services: $(VENV)/.installed-dev
	$(BIN)/python tests/ensure_services.py

test: services
	$(BIN)/pytest $(PYTEST_ARGS)

# The chaos suite alone (also part of `make test`): workers killed, Redis flushed,
# Postgres cut off, poison messages, provider fault storms, fuzzed input.
chaos: services
	$(BIN)/pytest -m chaos $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
