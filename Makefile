# Two commands: `make run` runs the default workflow, `make test` runs the test suite.
# Both create .venv and install the pinned dependencies first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 1
# pytest-xdist workers of `make test` (tests/conftest.py keeps the tests of one shared workflow on one worker)
TEST_WORKERS ?= 2

.PHONY: run test install install-test browser compiler clean memory-table

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

# requirements-test.txt holds llama-cpp-python (the GGUF export), which compiles llama.cpp: a C/C++ compiler first.
$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed | compiler
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}" \
		CMAKE_BUILD_PARALLEL_LEVEL="$${CMAKE_BUILD_PARALLEL_LEVEL:-$$(nproc)}" \
		$(BIN)/python -m pip install --quiet -r requirements-test.txt
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(BIN)/snakemake --cores $(CORES) all

# The report test opens the HTML report in a real headless browser: Debian's chromium (as root, as CI runs).
browser:
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 chromium; }

# llama-cpp-python's build needs gcc and g++: Debian's (as root, as CI runs), like chromium below.
compiler:
	command -v g++ >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 gcc g++; }

test: install-test browser
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

clean:
	rm -rf results logs .snakemake

.PHONY: test-slurm

# The SLURM workflow test alone: installs and starts a single-node cluster (tests/slurm/, as root).
test-slurm: install-test
	$(BIN)/python -m pytest tests/test_slurm.py $(PYTEST_ARGS)

# The memory comparison table at Qwen2.5-0.5B's shape with random weights (config/memory-table.yaml):
# trains every method for two steps, on the GPU when there is one, and prints the table. Its results
# go to their own experiment folder (results/qwen2.5-0.5b-shape-random--emoji_qa/), beside the default run's.
memory-table: install
	$(BIN)/snakemake --cores $(CORES) all --configfile config/memory-table.yaml
	@awk '/^## Memory comparison/{show=1} /^## Quality/{show=0} show' results/qwen2.5-0.5b-shape-random--emoji_qa/report/report.md
