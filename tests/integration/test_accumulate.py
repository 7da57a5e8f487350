"""A nightly run over a sliding window of date partitions into one growing output, on the
moto S3 server: earlier nights' images kept, each row generated once, overlap refused."""

from __future__ import annotations

import io
import json
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import koala_batch
from koala_batch.errors import OutputBusyError, OutputConflictError
from koala_batch.output.verify import verify_output
from koala_batch.spec import spec_from_dict
from tests.conftest import tiny_spec

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

DAYS = ["2026-11-25", "2026-11-26", "2026-11-27"]
ROWS_PER_DAY = 5


@pytest.fixture
def daily_prompts(s3_server, s3_bucket):
    """One Parquet partition of prompts per day, ids unique across days."""
    fs = s3_server.filesystem()
    for day in DAYS:
        ids = [f"{day}-{row}" for row in range(ROWS_PER_DAY)]
        table = pa.table({"prompt": [f"a lighthouse at dusk, {i}" for i in ids], "id": ids})
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        fs.pipe_file(f"{s3_bucket}/prompts/date={day}/part-0.parquet", buffer.getvalue())
    return fs


def nightly_spec(s3_server, bucket: str, window: list[str], **output) -> dict:
    """The nightly spec over the partitions of `window`, into one output."""
    spec = tiny_spec(
        [f"s3://{bucket}/prompts/date={day}/" for day in window],
        f"s3://{bucket}/nightly",
        input={"id_column": "id", "storage_options": s3_server.storage_options},
        output={
            "rows_per_shard": 4,
            "accumulate": True,
            "heartbeat_s": 0.5,
            "storage_options": s3_server.storage_options,
            **output,
        },
    )
    return spec


def committed_ids(fs, bucket: str) -> list[str]:
    fs.invalidate_cache()
    manifests = [
        pq.read_table(io.BytesIO(fs.cat_file(path)), columns=["id"])
        for path in fs.glob(f"{bucket}/nightly/manifests/*.parquet")
    ]
    return sorted(pa.concat_tables(manifests).column("id").to_pylist())


def test_three_nights_over_a_two_day_window_keep_every_night_and_generate_each_row_once(
    s3_server, s3_bucket, daily_prompts
):
    fs = daily_prompts
    night = nightly_spec(s3_server, s3_bucket, DAYS[:1])
    outcome: dict[str, object] = {}
    first = threading.Thread(target=lambda: outcome.update(record=koala_batch.run(night)))
    first.start()
    deadline = time.monotonic() + 60
    while not fs.invalidate_cache() and not fs.glob(f"{s3_bucket}/nightly/_lease/*.json"):
        assert time.monotonic() < deadline and first.is_alive(), "the first run took no lease"
        time.sleep(0.05)
    # A second run while the first one works: refused, and it leaves the output alone.
    with pytest.raises(OutputBusyError, match="is being written by run") as busy:
        koala_batch.run(night)
    assert "rerun this command to resume" in str(busy.value)
    first.join()
    record = outcome["record"]
    assert isinstance(record, dict)
    assert record["counts"]["images_written_this_run"] == ROWS_PER_DAY
    assert record["counts"]["images_kept"] == 0
    fs.invalidate_cache()
    assert fs.glob(f"{s3_bucket}/nightly/_lease/*.json") == []  # released at the end

    second = koala_batch.run(nightly_spec(s3_server, s3_bucket, DAYS[:2]))
    # Day 1 is in the window still, and committed: only day 2 is generated.
    assert second["counts"]["images_written_this_run"] == ROWS_PER_DAY
    assert second["counts"]["images_kept"] == 0
    assert second["counts"]["images_committed"] == 2 * ROWS_PER_DAY

    third_spec = nightly_spec(s3_server, s3_bucket, DAYS[1:3])
    third = koala_batch.run(third_spec)
    # Day 1 slid out of the window: its images are kept and counted apart.
    counts = third["counts"]
    assert counts["images_written_this_run"] == ROWS_PER_DAY
    assert counts["images_kept"] == ROWS_PER_DAY
    assert counts["images_planned"] == 2 * ROWS_PER_DAY
    assert counts["images_committed"] == 3 * ROWS_PER_DAY
    assert json.loads(fs.cat_file(f"{s3_bucket}/nightly/_SUCCESS"))["counts"] == counts

    # The third night again (a retry of the RayJob): nothing is generated twice.
    again = koala_batch.run(third_spec)
    assert again["counts"]["images_written_this_run"] == 0
    assert again["counts"]["images_kept"] == ROWS_PER_DAY
    assert again["counts"]["images_committed"] == 3 * ROWS_PER_DAY
    expected = sorted(f"{day}-{row}" for day in DAYS[:3] for row in range(ROWS_PER_DAY))
    assert committed_ids(fs, s3_bucket) == expected  # each image once

    report = verify_output(f"s3://{s3_bucket}/nightly", spec=spec_from_dict(third_spec))
    assert report.ok, report.format()
    assert report.kept_images == ROWS_PER_DAY and report.missing_inputs == 0
    assert "of earlier inputs kept" in report.format()

    # The same output without accumulate is refused, and the message names the mode.
    plain = nightly_spec(s3_server, s3_bucket, DAYS[1:3], accumulate=False)
    with pytest.raises(OutputConflictError, match="output.accumulate: true"):
        koala_batch.run(plain)
    assert not verify_output(f"s3://{s3_bucket}/nightly", spec=spec_from_dict(plain)).ok
    assert committed_ids(fs, s3_bucket) == expected

    # A shard of day 1 (out of the window) damaged: this input cannot make its images
    # again, so the run stops before it uncommits anything, naming the shard.
    lost_shard = next(
        path.rsplit("/", 1)[-1].removesuffix(".parquet")
        for path in sorted(fs.glob(f"{s3_bucket}/nightly/manifests/*.parquet"))
        if any(
            row_id.startswith(DAYS[0])
            for row_id in pq.read_table(io.BytesIO(fs.cat_file(path))).column("id").to_pylist()
        )
    )
    fs.rm_file(f"{s3_bucket}/nightly/shards/{lost_shard}.tar")
    with pytest.raises(OutputConflictError, match="no longer has") as damaged:
        koala_batch.run(third_spec)
    assert f"manifests/{lost_shard}.parquet: its tar is missing; " in str(damaged.value)
    assert "Restore the shards' files" in str(damaged.value)
    assert committed_ids(fs, s3_bucket) == expected  # its manifest stays: nothing given up
