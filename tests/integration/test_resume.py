"""Resume: a rerun generates only what is not committed; a changed spec is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import koala_batch
from koala_batch.config import spec_from_dict
from koala_batch.errors import JobFailedError, OutputBusyError, OutputConflictError
from koala_batch.verify import verify_output
from tests.conftest import REPO_ROOT, tiny_spec, write_prompt_table
from tests.integration.conftest import start_local_ray

pytestmark = pytest.mark.usefixtures("ray_local")

CLI = str(Path(sys.executable).parent / "koala-batch")


def manifest_rows(output: Path) -> list[dict]:
    return [
        row
        for path in sorted((output / "manifests").glob("*.parquet"))
        for row in pq.read_table(path).to_pylist()
    ]


@pytest.fixture(scope="module")
def finished_template(tmp_path_factory, model_cache):
    """One finished 20-image job (5 shards of 4), made once for the module."""
    root = tmp_path_factory.mktemp("finished")
    ids = [f"r{i:02d}" for i in range(20)]
    table = write_prompt_table(root / "in.parquet", [f"a teapot, style {i}" for i in ids], id=ids)
    output = root / "out"
    spec = tiny_spec(
        str(table), str(output), input={"id_column": "id"}, output={"rows_per_shard": 4}
    )
    start_local_ray()
    record = koala_batch.run(spec)
    assert record["counts"]["shards"] == 5
    return spec, output, ids


@pytest.fixture
def finished_job(finished_template, tmp_path):
    """A copy of the finished job's output, each test its own."""
    spec, template, ids = finished_template
    output = tmp_path / "out"
    shutil.copytree(template, output)
    return {**spec, "output": {**spec["output"], "uri": str(output)}}, output, ids


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


def test_damaged_committed_shards_are_generated_again(finished_job, caplog):
    spec, output, ids = finished_job
    before = {row["key"]: row for row in manifest_rows(output)}
    tars = sorted((output / "shards").glob("*.tar"))
    manifests = sorted((output / "manifests").glob("*.parquet"))
    tars[0].unlink()  # lost: the manifest still says committed
    tars[1].write_bytes(tars[1].read_bytes()[:1000])  # truncated
    manifests[2].write_bytes(b"not parquet")  # a committed marker that cannot be read

    with caplog.at_level("WARNING", logger="koala_batch"):
        record = koala_batch.run(spec)

    assert record["counts"]["images_written_this_run"] == 12  # the three shards of four
    assert record["counts"]["images_committed"] == 20
    assert "3 committed shard(s) were damaged" in caplog.text
    assert "its tar is missing" in caplog.text and "its manifest records" in caplog.text
    after = {row["key"]: row for row in manifest_rows(output)}
    assert after.keys() == before.keys() and sorted(row["id"] for row in after.values()) == ids
    for key, row in after.items():
        assert (row["seed"], row["sha256"]) == (before[key]["seed"], before[key]["sha256"])
    report = verify_output(str(output), spec=spec_from_dict(spec))
    assert report.ok, report.format()


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


def test_rerun_after_rows_left_the_input_is_refused_without_damage(finished_job, tmp_path):
    spec, output, ids = finished_job
    fewer = write_prompt_table(
        tmp_path / "fewer.parquet", [f"a teapot, style {i}" for i in ids[:15]], id=ids[:15]
    )
    shrunk = {**spec, "input": {**spec["input"], "uri": str(fewer)}}
    before = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}

    with pytest.raises(OutputConflictError) as refused:
        koala_batch.run(shrunk)

    message = str(refused.value)
    assert "holds 20 committed images but this input plans 15" in message
    assert "5 belong to rows no longer in the input" in message and "--overwrite" in message
    # A complete output stays complete: _SUCCESS and every shard as they were. (_job.json
    # is rewritten with the refused run's id; its fingerprint is the same.)
    after = {p: p.read_bytes() for p in output.rglob("*") if p.is_file()}
    assert after.keys() == before.keys()
    assert all(after[p] == before[p] for p in before if p.name != "_job.json")
    assert verify_output(str(output), spec=spec_from_dict(spec)).ok


def test_two_runs_started_together_on_a_new_output_commit_each_image_once(tmp_path):
    ids = [f"r{i:02d}" for i in range(16)]
    table = write_prompt_table(tmp_path / "in.parquet", [f"a kite {i}" for i in ids], id=ids)
    output = tmp_path / "out"
    spec = tiny_spec(
        str(table),
        str(output),
        input={"id_column": "id"},
        output={"rows_per_shard": 4, "heartbeat_s": 0.5},
    )
    start = threading.Barrier(2)

    def run() -> dict | Exception:
        start.wait()
        try:
            return koala_batch.run(spec)
        except (OutputConflictError, OutputBusyError, JobFailedError) as failed:
            return failed

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda _: run(), range(2)))

    records = [o for o in outcomes if isinstance(o, dict)]
    failures = [str(o) for o in outcomes if isinstance(o, Exception)]
    # One takes the output's lease; the other finds it held by a live run and leaves the
    # output alone.
    assert len(records) == 1 and len(failures) == 1, outcomes
    assert "is being written by run" in failures[0]
    assert records[0]["counts"]["images_committed"] == 16
    rows = manifest_rows(output)
    assert sorted(row["id"] for row in rows) == ids  # each image once
    assert verify_output(str(output), spec=spec_from_dict(spec)).ok
