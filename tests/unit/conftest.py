"""Helpers for the unit tests: specs and encoded tables built in memory (no Ray, no model)."""

from __future__ import annotations

import hashlib
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from koala_batch.inputs.rows import made_from_of
from koala_batch.keys import derived_seed, sample_key
from koala_batch.spec import JobSpec, spec_from_dict
from tests.conftest import tiny_spec


def make_spec(output_uri: str | Path, input_uri: str = "prompts.parquet", **sections) -> JobSpec:
    """A validated tiny-model JobSpec writing to output_uri."""
    return spec_from_dict(tiny_spec(input_uri, str(output_uri), **sections))


def png_bytes(seed: int, width: int = 64, height: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded_table(
    spec: JobSpec,
    ids: list[str],
    *,
    errors: set[int] = frozenset(),
    first_ordinal: int = 0,
    passthrough: dict[str, list] | None = None,
) -> pa.Table:
    """Rows shaped like the generate stage's output: one encoded image (index 0) per id.

    Rows whose position is in `errors` are error rows: no image, no sha256, 0 bytes.
    """
    rows: dict[str, list] = {
        name: []
        for name in (
            "id",
            "image_index",
            "key",
            "seed",
            "ordinal",
            "prompt",
            "negative_prompt",
            "steps",
            "guidance_scale",
            "width",
            "height",
            "made_from",
            "source",
            "row_index",
            "status",
            "error",
            "prompt_truncated",
            "image",
            "sha256",
            "bytes",
            "generated_at",
        )
    }
    for position, row_id in enumerate(ids):
        failed = position in errors
        image = None if failed else png_bytes(position + 1000 * first_ordinal)
        rows["id"].append(row_id)
        rows["image_index"].append(0)
        rows["key"].append(sample_key(row_id, 0))
        rows["seed"].append(derived_seed(spec.generation.seed, row_id, 0))
        rows["ordinal"].append(first_ordinal + position)
        rows["prompt"].append("" if failed else f"a photo of thing {row_id}")
        rows["negative_prompt"].append(None)
        for name, value in spec.row_defaults().items():
            rows[name].append(value)
        rows["made_from"].append(
            made_from_of(rows["prompt"][-1], None, rows["seed"][-1], spec.row_defaults())
        )
        rows["source"].append("prompts.parquet")
        rows["row_index"].append(first_ordinal + position)
        rows["status"].append("error" if failed else "ok")
        rows["error"].append("prompt is empty or whitespace only" if failed else None)
        rows["prompt_truncated"].append(False)
        rows["image"].append(image)
        rows["sha256"].append(None if failed else hashlib.sha256(image).hexdigest())
        rows["bytes"].append(0 if failed else len(image))
        rows["generated_at"].append(1_800_000_000.0 + position)
    types = {
        "image_index": pa.int32(),
        "seed": pa.int64(),
        "steps": pa.int32(),
        "guidance_scale": pa.float64(),
        "width": pa.int32(),
        "height": pa.int32(),
        "ordinal": pa.int64(),
        "row_index": pa.int64(),
        "prompt_truncated": pa.bool_(),
        "image": pa.binary(),
        "bytes": pa.int64(),
        "generated_at": pa.float64(),
    }
    columns = {
        name: pa.array(values, types.get(name, pa.string())) for name, values in rows.items()
    }
    for name, values in (passthrough or {}).items():
        columns[name] = pa.array(values)
    return pa.table(columns)


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """An output prefix that does not exist yet."""
    return tmp_path / "out"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: bitwise comparisons and pinned float32 values need
    one float reduction order across calls."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def race(action, racers: int) -> list:
    """`action(i)` for i in range(racers), all released at the same moment on threads."""
    start = threading.Barrier(racers)

    def run(racer: int):
        start.wait()
        return action(racer)

    with ThreadPoolExecutor(racers) as pool:
        return list(pool.map(run, range(racers)))


def race_for_claim(storage, spec: JobSpec, racers: int) -> list[str]:
    """Claims of one output by `racers` runs at once: each "created" (it made the output
    its own), "resumed" (it saw another's claim and took over) or "refused" (it lost the
    create-only write of _job.json)."""
    from koala_batch.errors import OutputConflictError
    from koala_batch.output.commit import claim_output

    def claim(racer: int) -> str:
        try:
            resumed = claim_output(storage, spec, run_id=f"run{racer}")
        except OutputConflictError as refused:
            assert "claimed by another run while this one started" in str(refused)
            return "refused"
        return "resumed" if resumed else "created"

    return race(claim, racers)
