# The two set-up commands (see README.md):
#   make demo   create .venv, install embindex, build the quickstart index, run a query
#   make test   create .venv, install embindex with its test extras, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/python -m pip
# CPU torch by default; on a CUDA machine: make demo TORCH_CONSTRAINT=/dev/null
TORCH_CONSTRAINT ?= constraints.txt
PIP_FLAGS := -q -c $(TORCH_CONSTRAINT)

export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install install-test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/bin/python
	$(PIP) install $(PIP_FLAGS) "torch==2.13.0" 2>/dev/null || $(PIP) install $(PIP_FLAGS) torch
	$(PIP) install $(PIP_FLAGS) -e .

install-test: $(VENV)/bin/python
	$(PIP) install $(PIP_FLAGS) "torch==2.13.0" 2>/dev/null || $(PIP) install $(PIP_FLAGS) torch
	$(PIP) install $(PIP_FLAGS) -e ".[test]"

demo: install
	$(VENV)/bin/embindex build configs/quickstart.yaml
	$(VENV)/bin/embindex search indexes/quickstart "how do I read a compressed file" -k 5
	$(VENV)/bin/embindex inspect indexes/quickstart

test: install-test
	$(VENV)/bin/python -m pytest -q -ra tests

bench: install-test
	$(VENV)/bin/python benchmarks/throughput.py

clean:
	rm -rf indexes/quickstart .pytest_cache
