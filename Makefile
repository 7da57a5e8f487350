# Entry points, each from a fresh clone:  make smoke  |  make check  (lint, types, tests)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CODE := koala_batch tests bench

.PHONY: setup smoke lint test test-fast test-quick check clean gpu-wheels

# torch goes in first and alone, with pip: on a CPU machine with the local CPU wheel
# (pip's find-links) this takes it instead of a multi-GB CUDA build; on a GPU machine it
# is the ordinary PyPI CUDA wheel. Everything else is then pinned by constraints.txt and
# installed by uv, which keeps the torch already there and installs the rest in about a
# minute where pip takes about two and a half (CI's time budget). --compile-bytecode as
# pip does: uv leaves no .pyc behind, and then every Ray worker compiles diffusers'
# and transformers' sources again at import (15 s instead of 10 per generator actor).
UV_VERSION := 0.13.9
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet "uv==$(UV_VERSION)"
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -c constraints.txt -e ".[test]"
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

# A contributor's loop: the unit tests and the integration tests not marked slow (no
# tests that run whole jobs), two files at a time; about 2.5 minutes here.
test-quick: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile -m "not slow"

# Two test files at a time: most of an integration test's time is one process importing
# torch and diffusers (a generator actor, a CLI run) while the other core waits. Each
# worker has its own Ray cluster and S3 server; --dist loadfile keeps a file's tests (and
# its module-scoped job outputs) on one worker.
test: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile

check: lint test

# Wheels for bench/gpu.py on a GPU machine with no network: the packages of the generator
# path that its image lacks (Ray and s3fs are not on that path). The versions are the
# venv's, which constraints.txt pinned and pip resolved (pydantic-core as pydantic
# requires it). typing-extensions is there already but maybe older than pydantic needs:
# bench/gpu.py installs a wheel only where the machine's own copy is missing or older.
# diffusers also declares importlib_metadata, which it imports only on Python < 3.8.
# For a dry run here: make gpu-wheels GPU_PYTHON=3.11 WHEELS=/tmp/wheels311
GPU_PYTHON ?= 3.12
WHEELS ?= bench/wheels
GPU_WHEEL_PACKAGES := diffusers pydantic pydantic-core annotated-types typing-inspection \
	typing-extensions
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64

gpu-wheels: setup
	mkdir -p $(WHEELS)
	rm -f $(WHEELS)/*.whl  # one version of each: two would stop the install there
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: \
		--python-version $(GPU_PYTHON) --implementation cp \
		$(addprefix --platform ,$(GPU_PLATFORMS)) -d $(WHEELS) \
		$$($(BIN)/python -c 'import sys; from importlib.metadata import version; \
			print(*(f"{n}=={version(n)}" for n in sys.argv[1:]))' $(GPU_WHEEL_PACKAGES))
	ls $(WHEELS) && du -sh $(WHEELS)

clean:
	rm -rf $(VENV) out bench/wheels
