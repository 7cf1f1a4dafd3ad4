# Two commands: `make run` runs the default workflow, `make test` runs the test suite.
# Both create .venv and install the pinned dependencies first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 1

.PHONY: run test install install-test browser clean

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

# The report test opens the HTML report in a real headless browser: Debian's chromium (as root, as CI runs).
browser:
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 chromium; }

test: install-test browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf results logs .snakemake

.PHONY: test-slurm

# The SLURM workflow test alone: installs and starts a single-node cluster (tests/slurm/, as root).
test-slurm: install-test
	$(BIN)/python -m pytest tests/test_slurm.py $(PYTEST_ARGS)
