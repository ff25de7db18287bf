# The two set-up commands (see README.md):
#   make demo   create .venv, install embindex, build the quickstart index, run a query
#   make test   create .venv, install embindex with its test extras, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PIP    := $(VENV)/bin/python -m pip
# torch is pinned by constraints.txt to the CPU wheel (2.13.0) so that no install pulls a multi-GB
# CUDA build. On a GPU machine with a CUDA torch already installed: make demo CONSTRAINTS=/dev/null
CONSTRAINTS ?= constraints.txt
PIP_FLAGS := -q -c $(CONSTRAINTS)

export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install install-test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/bin/python
	$(PIP) install $(PIP_FLAGS) -e ".[cpu,demo]"

install-test: $(VENV)/bin/python
	$(PIP) install $(PIP_FLAGS) -e ".[cpu,test]"

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
