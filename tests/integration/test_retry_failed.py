"""`run --retry-failed`: failed images generated again, every key left with one row; a
retry cut short between committing the new rows and retiring the old ones is finished by
the next run (webdataset, the default format)."""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import koala_batch
from koala_batch import Substitutes
from koala_batch.output.commit import retired_rows
from koala_batch.output.verify import verify_output
from koala_batch.spec import spec_from_dict
from tests.conftest import tiny_spec, write_prompt_table
from tests.integration.conftest import start_local_ray
from tests.integration.faulty_generators import FAILING_PROMPT, fault_injecting_generator

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

IDS = [f"r{i:02d}" for i in range(12)]
# Fail in the first run's generator only; the normal generator makes their images.
FIXABLE = {"r01", "r05", "r10"}
EMPTY = "r06"  # an empty prompt fails validation, in every run


def manifest_rows(output: Path) -> list[dict]:
    return [
        row
        for path in sorted((output / "manifests").glob("*.parquet"))
        for row in pq.read_table(path).to_pylist()
    ]


def shard_names(output: Path) -> set[str]:
    return {path.stem for path in (output / "manifests").glob("*.parquet")}


def with_output(spec: dict, output: Path) -> dict:
    return {**spec, "output": {**spec["output"], "uri": str(output)}}


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, model_cache):
    """12 images, 4 of them committed as errors (3 fixable, 1 empty prompt)."""
    root = tmp_path_factory.mktemp("retry-first")
    prompts = [
        FAILING_PROMPT if row_id in FIXABLE else "" if row_id == EMPTY else f"a kite, {row_id}"
        for row_id in IDS
    ]
    table = write_prompt_table(root / "in.parquet", prompts, id=IDS)
    output = root / "out"
    calls = root / "calls"
    calls.mkdir()
    spec = tiny_spec(
        str(table),
        str(output),
        input={"id_column": "id"},
        output={"rows_per_shard": 4, "max_failed_fraction": 0.5},
    )
    start_local_ray()
    record = koala_batch.run(spec, Substitutes(generator_cls=fault_injecting_generator(calls)))
    assert record["counts"]["images_failed"] == 4
    assert record["counts"]["images_retried"] == 0
    return spec, output


@pytest.fixture(scope="module")
def retried(first_run, tmp_path_factory):
    """A copy of the first run's output, retried with the normal generator."""
    spec, template = first_run
    output = tmp_path_factory.mktemp("retry-again") / "out"
    shutil.copytree(template, output)
    spec = with_output(spec, output)
    lines = Lines()
    logger = logging.getLogger("koala_batch")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(lines)
    try:
        start_local_ray()
        record = koala_batch.run(spec, retry_failed=True)
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    return spec, output, record, lines.lines


def test_every_key_has_exactly_one_row(retried):
    _, output, _, _ = retried
    rows = manifest_rows(output)
    assert Counter(row["id"] for row in rows) == Counter(IDS)
    assert len({row["key"] for row in rows}) == len(IDS)


def test_former_error_rows_are_ok_and_their_images_are_in_the_tars(retried):
    _, output, _, _ = retried
    rows = {row["id"]: row for row in manifest_rows(output)}
    for row_id in sorted(FIXABLE):
        row = rows[row_id]
        assert (row["status"], row["error"]) == ("ok", None), row_id
        with tarfile.open(output / "shards" / f"{row['shard']}.tar") as archive:
            members = archive.getnames()
        assert row["member"] in members and f"{row['key']}.json" in members
    assert rows[EMPTY]["status"] == "error"
    assert rows[EMPTY]["error"] == "prompt is empty or whitespace only"


def test_the_record_counts_the_retried_images(retried):
    _, output, record, _ = retried
    counts = record["counts"]
    assert counts["images_retried"] == 4
    assert counts["images_retried_ok"] == 3
    assert (counts["images_committed"], counts["images_ok"], counts["images_failed"]) == (
        12,
        11,
        1,
    )
    assert counts["images_written_this_run"] == 4
    assert counts["shards"] == len(shard_names(output))
    assert json.loads((output / "_SUCCESS").read_text())["counts"] == counts


def test_the_run_says_how_many_failed_images_it_retries(retried):
    _, _, _, lines = retried
    assert "retrying 4 failed image(s) recorded as error rows" in lines
    assert "retried 4 failed image(s): 3 now ok, 1 failed again" in lines


def test_the_retried_output_verifies(retried):
    spec, output, _, _ = retried
    report = verify_output(str(output), spec=spec_from_dict(spec))
    assert report.ok, report.format()
    assert (report.rows_checked, report.rows_failed, report.missing_inputs) == (12, 1, 0)


def test_old_shards_keep_their_data_and_lose_only_their_retried_rows(first_run, retried):
    _, template = first_run
    _, output, _, _ = retried
    before = {row["key"]: row for row in manifest_rows(template)}
    retried_keys = {key for key, row in before.items() if row["status"] == "error"}
    rewritten = 0
    for shard in shard_names(template) & shard_names(output):
        tar = f"shards/{shard}.tar"
        assert (output / tar).read_bytes() == (template / tar).read_bytes(), shard
        old = pq.read_table(template / "manifests" / f"{shard}.parquet")
        new = pq.read_table(output / "manifests" / f"{shard}.parquet")
        gone = set(old.column("key").to_pylist()) - set(new.column("key").to_pylist())
        assert gone <= retried_keys
        assert set(retired_rows(new.schema)) == gone
        rewritten += bool(gone)
    assert rewritten >= 1


def test_a_retry_cut_short_is_finished_by_the_next_plain_run(first_run, retried, tmp_path):
    spec, template = first_run
    _, done, _, _ = retried
    # A retry that committed its new shards and stopped before retiring the old rows: the
    # first output, no _SUCCESS (a retry removes it first), plus the retry's new shards.
    output = tmp_path / "out"
    shutil.copytree(template, output)
    (output / "_SUCCESS").unlink()
    for shard in shard_names(done) - shard_names(template):
        for relative in (f"manifests/{shard}.parquet", f"shards/{shard}.tar"):
            shutil.copyfile(done / relative, output / relative)
    spec = with_output(spec, output)
    cut_short = verify_output(str(output))
    assert any("a retry of failed images was cut short" in p for p in cut_short.problems)

    record = koala_batch.run(spec)

    rows = {row["id"]: row for row in manifest_rows(output)}
    assert len(manifest_rows(output)) == len(rows) == len(IDS)
    assert all(rows[row_id]["status"] == "ok" for row_id in FIXABLE)
    counts = record["counts"]
    assert (counts["images_committed"], counts["images_failed"]) == (12, 1)
    assert (counts["images_written_this_run"], counts["images_retried"]) == (0, 0)
    report = verify_output(str(output), spec=spec_from_dict(spec))
    assert report.ok, report.format()
