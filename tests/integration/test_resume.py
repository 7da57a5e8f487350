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
from koala_batch.errors import JobFailedError, OutputBusyError, OutputConflictError
from koala_batch.output.verify import verify_output
from koala_batch.spec import spec_from_dict
from tests.conftest import REPO_ROOT, tiny_spec, write_prompt_table
from tests.integration.conftest import start_local_ray

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

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


def snapshot(output: Path) -> dict[Path, bytes]:
    """Every file of an output, byte for byte."""
    return {path: path.read_bytes() for path in output.rglob("*") if path.is_file()}


def with_input(spec: dict, path: Path) -> dict:
    return {**spec, "input": {**spec["input"], "uri": str(path)}}


def test_rerun_after_rows_left_the_input_is_refused_without_damage(finished_job, tmp_path):
    spec, output, ids = finished_job
    fewer = write_prompt_table(
        tmp_path / "fewer.parquet", [f"a teapot, style {i}" for i in ids[:15]], id=ids[:15]
    )
    before = snapshot(output)

    with pytest.raises(OutputConflictError) as refused:
        koala_batch.run(with_input(spec, fewer))

    message = str(refused.value)
    assert f"output {output.as_uri()} holds 5 committed image(s) of rows not in this" in message
    assert "output.accumulate: true" in message and "--overwrite" in message
    # Refused before the lease or the claim: the output is byte for byte as it was.
    assert snapshot(output) == before
    assert verify_output(str(output), spec=spec_from_dict(spec)).ok


def test_a_day_of_other_ids_on_the_same_output_exits_2_untouched(finished_job, tmp_path):
    """The nightly job without output.accumulate: day 2's input holds as many rows as day
    1's, all of them new. A count said done; the keys say none of day 2 is."""
    spec, output, _ = finished_job
    day2 = [f"p2-{i:05d}" for i in range(20)]
    table = write_prompt_table(tmp_path / "day2.parquet", [f"a kite {i}" for i in day2], id=day2)
    spec_path = tmp_path / "day2.json"
    spec_path.write_text(json.dumps(with_input(spec, table)))
    before = snapshot(output)

    refused = subprocess.run(
        [CLI, "run", str(spec_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )

    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert "holds 20 committed image(s) of rows not in this input" in last
    assert snapshot(output) == before


def test_rows_that_left_and_arrived_are_refused_before_any_generation(finished_job, tmp_path):
    spec, output, ids = finished_job
    mixed = ids[5:] + [f"new-{i}" for i in range(10)]  # 5 left, 10 arrived: 25 planned
    table = write_prompt_table(
        tmp_path / "mixed.parquet", [f"a teapot, style {i}" for i in mixed], id=mixed
    )
    before = snapshot(output)

    with pytest.raises(OutputConflictError, match="holds 5 committed image"):
        koala_batch.run(with_input(spec, table))
    assert snapshot(output) == before


def test_a_prompt_changed_under_the_same_id_is_refused_naming_it(finished_job, tmp_path):
    spec, output, ids = finished_job
    prompts = [f"a teapot, style {i}" for i in ids]
    prompts[7] = "a teapot, repainted"
    table = write_prompt_table(tmp_path / "edited.parquet", prompts, id=ids)
    before = snapshot(output)

    with pytest.raises(OutputConflictError) as refused:
        koala_batch.run(with_input(spec, table))

    message = str(refused.value)
    assert "1 committed image(s) were generated from input rows that have changed" in message
    assert f"e.g. id '{ids[7]}' image 0 (edited.parquet row 7)" in message
    assert "new ids" in message and "--overwrite" in message
    assert snapshot(output) == before
    # verify --spec says the same of the output against the edited input.
    report = verify_output(str(output), spec=spec_from_dict(with_input(spec, table)))
    assert not report.ok
    assert any(
        f"row 7 (id {ids[7]!r}) image 0 has changed since its image was generated" in p
        for p in report.problems
    ), report.format()


def test_a_failed_row_may_change_and_retry_failed_makes_it_from_the_new_row(
    model_cache, tmp_path, caplog
):
    ids = ["a", "b", "c", "d"]
    prompts = ["a red fox", "", "a blue jay", "a green frog"]  # b fails: empty prompt
    table = write_prompt_table(tmp_path / "in.parquet", prompts, id=ids)
    spec = tiny_spec(
        str(table),
        str(tmp_path / "out"),
        input={"id_column": "id"},
        output={"rows_per_shard": 2, "max_failed_fraction": 1.0},
    )
    assert koala_batch.run(spec)["counts"]["images_failed"] == 1
    fixed = write_prompt_table(
        tmp_path / "fixed.parquet", [*prompts[:1], "a grey owl", *prompts[2:]], id=ids
    )
    fixed_spec = with_input(spec, fixed)

    with caplog.at_level("INFO", logger="koala_batch"):
        plain = koala_batch.run(fixed_spec)
    assert plain["counts"]["images_failed"] == 1  # a plain run leaves failures as they are
    assert "1 failed image(s) have changed input rows since they failed" in caplog.text

    retried = koala_batch.run(fixed_spec, retry_failed=True)

    assert retried["counts"]["images_failed"] == 0
    [row] = [r for r in manifest_rows(tmp_path / "out") if r["id"] == "b"]
    assert row["status"] == "ok" and row["prompt"] == "a grey owl"
    assert verify_output(str(tmp_path / "out"), spec=spec_from_dict(fixed_spec)).ok


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


def test_an_accumulating_run_counts_progress_over_its_planned_keys(finished_job, tmp_path, caplog):
    """r00-r19 committed, an input of r10-r29: done counts the planned keys committed (10
    at the start), never the kept images of r00-r09."""
    spec, output, ids = finished_job
    window = [f"r{i:02d}" for i in range(10, 30)]
    table = write_prompt_table(
        tmp_path / "window.parquet", [f"a teapot, style {i}" for i in window], id=window
    )
    spec = with_input(spec, table)
    spec["output"]["accumulate"] = True

    with caplog.at_level("INFO", logger="koala_batch"):
        record = koala_batch.run(spec)

    commits = [r for r in caplog.records if getattr(r, "event", None) == "shard_committed"]
    assert commits and all(r.total == 20 and 10 < r.done <= 20 for r in commits)
    assert commits[-1].done == 20
    assert commits[-1].getMessage().endswith("10 of 10 this run")
    assert "resuming: 10 of the 20 planned images already committed" in caplog.text
    assert record["counts"]["images_kept"] == 10
