# Two commands: `make run` runs the default workflow, `make test` runs the test suite.
# Both create .venv and install the pinned dependencies first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 1

.PHONY: run test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -r requirements-test.txt
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(BIN)/snakemake --cores $(CORES) all

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf results logs .snakemake

.PHONY: test-slurm

# The SLURM workflow test alone: installs and starts a single-node cluster (tests/slurm/, as root).
test-slurm: install-test
	$(BIN)/python -m pytest tests/test_slurm.py $(PYTEST_ARGS)
