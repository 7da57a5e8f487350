# Entry points, each from a fresh clone:  make smoke  |  make check  (lint, types, tests)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CODE := koala_batch tests bench

.PHONY: setup smoke lint test test-fast check clean

# torch goes in first and alone: on a CPU machine with the local CPU wheel (pip's
# find-links) this takes it instead of a multi-GB CUDA build; on a GPU machine it is
# the ordinary PyPI CUDA wheel. Everything else is then pinned by constraints.txt.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

setup: $(VENV)/.installed

smoke: setup
	$(BIN)/koala-batch run jobs/smoke.yaml

# Lint, format and type checks: fast, so they run before the tests.
lint: setup
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/mypy

# Unit tests only: no Ray, no S3 server; under a minute.
test-fast: setup
	$(BIN)/python -m pytest tests/unit

test: setup
	$(BIN)/python -m pytest

check: lint test

clean:
	rm -rf $(VENV) out
