"""Resume: a rerun generates only what is not committed; a changed spec is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import koala_batch
from koala_batch.errors import OutputConflictError
from tests.conftest import REPO_ROOT, tiny_spec, write_prompt_table

pytestmark = pytest.mark.usefixtures("ray_local")

CLI = str(Path(sys.executable).parent / "koala-batch")


def manifest_rows(output: Path) -> list[dict]:
    return [
        row
        for path in sorted((output / "manifests").glob("*.parquet"))
        for row in pq.read_table(path).to_pylist()
    ]


@pytest.fixture
def finished_job(tmp_path):
    ids = [f"r{i:02d}" for i in range(20)]
    table = write_prompt_table(
        tmp_path / "in.parquet", [f"a teapot, style {i}" for i in ids], id=ids
    )
    output = tmp_path / "out"
    spec = tiny_spec(
        str(table), str(output), input={"id_column": "id"}, output={"rows_per_shard": 4}
    )
    record = koala_batch.run(spec)
    assert record["counts"]["shards"] == 5
    return spec, output, ids


def test_resume_regenerates_only_uncommitted_shards(finished_job):
    spec, output, ids = finished_job
    before = {row["key"]: row for row in manifest_rows(output)}
    manifests = sorted((output / "manifests").glob("*.parquet"))
    kept = {path: path.stat().st_mtime_ns for path in manifests[2:]}
    # Uncommit two shards (their tars stay, as leftovers of a write cut short) and leave
    # half-written files behind, as a killed run would.
    for path in manifests[:2]:
        path.unlink()
    (output / "shards" / "000000000099-deadbeef.tar").write_bytes(b"partial tar")
    (output / "manifests" / "000000000099-deadbeef.parquet.0123.partial").write_bytes(b"x")
    (output / "_SUCCESS").unlink()

    record = koala_batch.run(spec)

    assert record["resumed"] is True
    assert record["counts"]["images_written_this_run"] == 8  # two shards of four
    assert record["counts"]["images_committed"] == 20
    assert {path: path.stat().st_mtime_ns for path in kept} == kept  # committed: untouched
    after = {row["key"]: row for row in manifest_rows(output)}
    assert sorted(row["id"] for row in after.values()) == ids
    assert after.keys() == before.keys()
    for key, row in after.items():  # the regenerated images are the same images
        assert (row["seed"], row["sha256"]) == (before[key]["seed"], before[key]["sha256"])
    leftovers = [
        p.name for p in output.rglob("*") if "deadbeef" in p.name or p.suffix == ".partial"
    ]
    assert leftovers == []
    tars = sorted(p.stem for p in (output / "shards").glob("*.tar"))
    assert tars == sorted(p.stem for p in (output / "manifests").glob("*.parquet"))
    assert json.loads((output / "_SUCCESS").read_text())["counts"]["images_ok"] == 20


def test_resume_of_a_finished_job_generates_nothing(finished_job):
    spec, output, _ = finished_job
    record = koala_batch.run(spec)
    assert record["resumed"] is True
    assert record["counts"]["images_written_this_run"] == 0
    assert record["counts"]["images_committed"] == 20


def test_changed_fingerprint_is_refused_and_overwrite_starts_over(finished_job, tmp_path):
    spec, output, ids = finished_job
    changed = {**spec, "generation": {**spec["generation"], "steps": 3}}
    with pytest.raises(OutputConflictError, match=r"changed: steps\).*--overwrite"):
        koala_batch.run(changed)
    assert len(manifest_rows(output)) == 20  # nothing touched

    spec_path = tmp_path / "changed.json"
    spec_path.write_text(json.dumps(changed))
    refused = subprocess.run(
        [CLI, "run", str(spec_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert refused.returncode == 2 and "images would differ" in refused.stderr
    overwritten = subprocess.run(
        [CLI, "run", str(spec_path), "--overwrite"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert overwritten.returncode == 0, overwritten.stderr[-3000:]
    rows = manifest_rows(output)
    assert sorted(row["id"] for row in rows) == ids
    assert {row["steps"] for row in rows} == {3}
