# Set-up and entry points. `make demo` and `make test` work on a fresh machine: they create the
# virtualenv and install everything first. torch==2.13.0 is installed before the package because
# on our machines that pin resolves to a local CPU build, while pyproject.toml keeps a range (an
# unpinned torch would pull several GB of CUDA wheels).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install test test-all demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,lm,plot]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

demo: install
	$(BIN)/python examples/demo.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .hypothesis
