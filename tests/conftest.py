"""Fixtures shared by every test layer: the tiny model cache and prompt tables."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_PROMPTS = REPO_ROOT / "jobs" / "data" / "parti-sample.parquet"


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """A model cache holding the tiny model; Ray workers find it through the environment."""
    from koala_batch.models.tiny import ensure_tiny_model

    cache = tmp_path_factory.mktemp("model-cache")
    os.environ["KOALA_BATCH_CACHE"] = str(cache)  # set before Ray starts: workers inherit it
    ensure_tiny_model(cache)
    return cache


def write_prompt_table(path: Path, prompts: list, **columns) -> Path:
    """Write a Parquet prompt table with a `prompt` column and any extra columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": prompts, **columns}), path)
    return path


@pytest.fixture
def sample_prompts() -> pa.Table:
    """The PartiPrompts sample shipped with the repo (64 rows)."""
    return pq.read_table(SAMPLE_PROMPTS)


def tiny_spec(input_uri, output_uri, **sections) -> dict:
    """A raw job spec for the tiny model, small and fast; sections override by key."""
    spec = {
        "input": {"uri": input_uri, "prompt_column": "prompt"},
        "model": {"name": "tiny"},
        "generation": {"width": 64, "height": 64, "steps": 2, "guidance_scale": 5.0, "seed": 7},
        "compute": {"actors": 1, "batch_size": 4, "num_cpus_per_actor": 1, "torch_threads": 1},
        "output": {"uri": output_uri, "rows_per_shard": 8},
    }
    for section, values in sections.items():
        spec.setdefault(section, {}).update(values)
    return spec


def default_sigint() -> None:
    """`preexec_fn` of a subprocess that a test interrupts as from a terminal: a shell
    without job control (CI's, `nohup ... &`) starts background jobs with SIGINT ignored,
    and the subprocess would keep ignoring it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
