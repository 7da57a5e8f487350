"""`koala_batch.generate_images` inside a user's own Ray Data pipeline, and the README's
example of it, run as written."""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import koala_batch
from koala_batch.errors import InputError, SpecError
from koala_batch.keys import image_seed, sample_key
from koala_batch.schemas import IMAGE_ROW_SCHEMA
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.usefixtures("ray_local")

JOB_SEED = 7
# A job spec without input.uri and output.uri.
SPEC = {
    "input": {"id_column": "id", "seed_column": "seed", "passthrough_columns": ["tag"]},
    "model": {"name": "tiny"},
    "generation": {
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance_scale": 5.0,
        "seed": JOB_SEED,
        "images_per_prompt": 2,
    },
    "compute": {"actors": 1, "batch_size": 2, "num_cpus_per_actor": 1, "torch_threads": 1},
}
PROMPTS = [
    {"id": "kite", "prompt": "a red kite", "seed": None, "tag": "sky"},
    {"id": "fox", "prompt": "a fox in snow", "seed": 1234, "tag": "animals"},
    {"id": "blank", "prompt": "  ", "seed": None, "tag": "none"},  # an error row
]

README_MARKER = "<!-- example: composable -->"


@pytest.fixture(scope="module")
def written(tmp_path_factory, model_cache):
    """The user's pipeline: prompts -> generate_images -> their filter -> their writer."""
    import ray.data
    from ray.data.expressions import col

    from tests.integration.conftest import start_local_ray

    start_local_ray()
    out = tmp_path_factory.mktemp("composable") / "images"
    images = koala_batch.generate_images(ray.data.from_items(PROMPTS), SPEC)
    images.filter(expr=col("status") == "ok").write_parquet(str(out))
    return pq.read_table(str(out))


def test_the_users_filter_keeps_the_ok_images_and_drops_the_error_row(written):
    assert sorted(written.column("id").to_pylist()) == ["fox", "fox", "kite", "kite"]
    assert set(written.column("status").to_pylist()) == {"ok"}


def test_rows_carry_the_image_and_every_manifest_column_but_the_writers(written):
    assert written.column_names == [*IMAGE_ROW_SCHEMA.names, "tag"]
    for row in written.to_pylist():
        image = Image.open(io.BytesIO(row["image"]))
        image.load()
        assert image.size == (64, 64)
        assert row["sha256"] == hashlib.sha256(row["image"]).hexdigest()
        assert row["bytes"] == len(row["image"])
        assert (row["width"], row["height"], row["steps"]) == (64, 64, 2)
        assert (row["model"], row["image_format"]) == ("tiny", "png")
        assert row["tag"] == {"kite": "sky", "fox": "animals"}[row["id"]]
        # a Dataset's rows have no file or position
        assert row["source"] is None and row["row_index"] is None and row["ordinal"] is None


def test_keys_and_seeds_are_those_a_job_gives_the_same_ids(written):
    row_seeds = {prompt["id"]: prompt["seed"] for prompt in PROMPTS}
    for row in written.to_pylist():
        identifier, index = row["id"], row["image_index"]
        assert row["key"] == sample_key(identifier, index)
        assert row["seed"] == image_seed(row_seeds[identifier], JOB_SEED, identifier, index)
    assert sorted(written.column("image_index").to_pylist()) == [0, 0, 1, 1]


def test_a_dataset_without_the_id_column_is_refused_at_once(model_cache):
    import ray.data

    without_ids = ray.data.from_items([{"prompt": "a kite", "seed": 1, "tag": "x"}])
    with pytest.raises(InputError, match=r"'id' \(input\.id_column\) is missing"):
        koala_batch.generate_images(without_ids, SPEC)
    no_id_column = {**SPEC, "input": {"passthrough_columns": ["tag"]}}
    with pytest.raises(SpecError, match="input.id_column is not set"):
        koala_batch.generate_images(without_ids, no_id_column)


def readme_example() -> str:
    """The fenced Python block after the README's composable marker."""
    text = (REPO_ROOT / "README.md").read_text()
    assert README_MARKER in text, f"README.md lost its example marker {README_MARKER}"
    after = text.split(README_MARKER, 1)[1]
    match = re.search(r"```(?:python)?\n(.*?)```", after, re.DOTALL)
    assert match, f"README.md: no fenced code block after {README_MARKER}"
    return match.group(1)


def test_the_readme_example_runs_as_written(tmp_path, model_cache, monkeypatch):
    import ray

    code = readme_example()
    # Run as written, but in this test session's Ray, whose workers do not share this
    # test's working directory: the example's own `ray.init()` (a second local cluster)
    # is skipped and its relative output folder made absolute.
    assert code.count('"generated/"') == 1, "the example's output folder changed"
    code = code.replace('"generated/"', repr(f"{tmp_path}/generated/"))
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: None)
    example = "README.md (example: composable)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, example, "exec"), {"__name__": "__main__"})
    # What Python shows a user by default: every warning but the deprecation kinds, and
    # those too when the user's own code (the example) triggers them.
    hidden = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)
    shown = [
        f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
        for w in caught
        if not issubclass(w.category, hidden) or w.filename == example
    ]
    assert not shown, "running the README example warns the user:\n" + "\n".join(shown)
    files = sorted(Path(tmp_path).rglob("*.parquet"))
    assert files, "the example wrote no Parquet files"
    rows = pa.concat_tables([pq.read_table(path) for path in files]).to_pylist()
    # The blank prompt is an error row, which the example's filter drops.
    assert sorted(row["id"] for row in rows) == ["fox", "kite"]
    assert all(row["status"] == "ok" for row in rows)
    for row in rows:
        assert Image.open(io.BytesIO(row["image"])).size == (64, 64)
