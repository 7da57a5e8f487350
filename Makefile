# Two entry points, each from a fresh clone:  make smoke  |  make test
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup smoke test clean

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

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) out
