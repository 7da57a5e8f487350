"""Per-shard stats: the failure-reason rule, the shard stats, their manifest metadata."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from koala_batch.output.commit import build_job_record
from koala_batch.output.layout import (
    DATA_BYTES_METADATA,
    FORMAT_METADATA,
    STATS_METADATA,
    data_metadata,
    recorded_data_bytes,
    recorded_format,
    recorded_stats,
    stats_metadata,
    summary_from_manifest,
)
from koala_batch.output.stats import (
    MAX_REASON_CHARS,
    UNKNOWN_REASON,
    as_failures,
    cost_lines,
    describe_cost,
    failure_reason,
    failures_by_reason,
    job_totals,
    run_cost,
    shard_stats,
)
from koala_batch.schemas import SUMMARY_SCHEMA, Col
from koala_batch.spec import JobSpec
from koala_batch.storage import Storage


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        ("prompt is null", "prompt is null"),
        ("prompt is empty or whitespace only", "prompt is empty or whitespace only"),
        # the exception type of a pipeline failure
        ("OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB", "OutOfMemoryError"),
        ("RuntimeError: injected failure for this prompt", "RuntimeError"),
        # the column a problem names
        ("prompt column 'text': not valid UTF-8 at byte 3", "prompt column 'text'"),
        ("id column 'uid' is null", "id column 'uid' is null"),
        # several problems of one row: the first counts
        ("id column 'uid' is null; prompt is null", "id column 'uid' is null"),
        # a seed's value varies per row, its reason does not
        ("seed 3.5 is not a whole number", "seed is not a whole number"),
        ("seed 'abc' is not an integer", "seed is not an integer"),
        ("seed -1 is negative; seeds are 0 to 2**63-1", "seed is negative"),
        ("seed 18446744073709551616 does not fit in 64 bits", "seed does not fit in 64 bits"),
        (
            "generated image has NaN or infinite values (would decode as black)",
            "generated image has NaN or infinite values",
        ),
        (None, UNKNOWN_REASON),
        ("", UNKNOWN_REASON),
        ("   ", UNKNOWN_REASON),
    ],
)
def test_failure_reason_groups_error_texts_by_their_class(error, reason):
    assert failure_reason(error) == reason


def test_a_long_reason_is_cut():
    reason = failure_reason("x" * 500)
    assert len(reason) == MAX_REASON_CHARS and reason.endswith("...")


def test_failures_by_reason_counts_most_frequent_first():
    errors = [
        "RuntimeError: a",
        "prompt is null",
        "RuntimeError: b",
        "seed 1.5 is not a whole number",
        "seed 2.5 is not a whole number",
        "RuntimeError: c",
    ]
    assert list(failures_by_reason(errors).items()) == [
        ("RuntimeError", 3),
        ("seed is not a whole number", 2),
        ("prompt is null", 1),
    ]


def _manifest() -> pa.Table:
    return pa.table(
        {
            Col.KEY: ["a-0", "b-0", "c-0", "d-0"],
            Col.STATUS: ["ok", "error", "ok", "error"],
            Col.ERROR: [None, "prompt is null", None, "RuntimeError: boom"],
            Col.BYTES: pa.array([100, 0, 50, 0], pa.int64()),
            Col.ORDINAL: pa.array([0, 1, 2, 3], pa.int64()),
        }
    )


def test_shard_stats_sum_the_rows_timings():
    stats = shard_stats(
        _manifest(),
        generate_s=[0.5, 0.0, 0.25, 0.0],
        encode_s=[0.01, 0.0, 0.02, None],
        generated_at=[10.0, 9.0, 12.0, None],
        committed_at=13.5,
    )
    assert stats == {
        "rows": 4,
        "ok": 2,
        "errors": 2,
        "failures": {"RuntimeError": 1, "prompt is null": 1},
        "generate_s": 0.75,
        "encode_s": 0.03,
        "image_bytes": 150,
        "first_generated_at": 9.0,
        "last_generated_at": 12.0,
        "committed_at": 13.5,
    }


def test_shard_stats_without_timings_record_none():
    stats = shard_stats(_manifest())
    assert stats["generate_s"] is None and stats["encode_s"] is None
    assert stats["first_generated_at"] is None and stats["committed_at"] is None


def test_stats_round_trip_through_the_manifest_metadata(tmp_path):
    stats = shard_stats(_manifest(), generate_s=[1.0, 0, 1.0, 0], generated_at=[1.0] * 4)
    manifest = _manifest()
    manifest = manifest.replace_schema_metadata(
        {**data_metadata("webdataset", 1234), **stats_metadata(stats)}
    )
    buffer = io.BytesIO()
    pq.write_table(manifest, buffer)

    # a reader of a subset of the columns still finds them (resume reads four columns)
    read = pq.read_table(io.BytesIO(buffer.getvalue()), columns=[Col.KEY, Col.STATUS])
    assert recorded_stats(read.schema) == stats
    assert recorded_data_bytes(read.schema) == 1234
    assert recorded_format(read.schema) == "webdataset"
    assert set(read.schema.metadata) >= {STATS_METADATA, FORMAT_METADATA, DATA_BYTES_METADATA}
    assert recorded_stats(pa.schema([])) is None


def test_the_summary_row_of_a_manifest_carries_its_stats(tmp_path):
    storage = Storage(str(tmp_path))
    stats = shard_stats(
        _manifest(), generate_s=[1.0, 0, 2.0, 0], encode_s=[0.5] * 4, generated_at=[5.0] * 4
    )
    manifest = _manifest().replace_schema_metadata(stats_metadata(stats))

    summary = summary_from_manifest(storage, "000000000000-abcdef01", manifest)

    # (reason, count) pairs, as the summary schema's map column gives them back
    assert summary["failures"] == [("RuntimeError", 1), ("prompt is null", 1)]
    assert summary["generate_s"] == 3.0 and summary["encode_s"] == 2.0
    assert summary["first_generated_at"] == summary["last_generated_at"] == 5.0
    row = pa.Table.from_pylist([summary], schema=SUMMARY_SCHEMA).to_pylist()[0]
    assert row["failures"] == summary["failures"]
    assert as_failures(row["failures"]) == {"RuntimeError": 1, "prompt is null": 1}


def test_a_manifest_without_stats_gives_its_failures_from_the_error_column(tmp_path):
    summary = summary_from_manifest(Storage(str(tmp_path)), "000000000000-abcdef01", _manifest())
    assert summary["failures"] == [("RuntimeError", 1), ("prompt is null", 1)]
    assert summary["generate_s"] is None


def test_job_totals_add_up_the_shards():
    shards = [
        {"ok": 3, "failures": [("RuntimeError", 1)], "generate_s": 1.5, "encode_s": 0.3},
        {"ok": 1, "failures": {"RuntimeError": 2, "prompt is null": 1}, "generate_s": 0.5},
        {"ok": 0, "failures": None, "generate_s": None, "encode_s": None},  # before stats
    ]
    assert job_totals(shards) == {
        "failures_by_reason": {"RuntimeError": 3, "prompt is null": 1},
        "generate_s": 2.0,
        "encode_s": 0.3,
        "gpu_s_per_image": 0.5,
    }
    assert job_totals([])["gpu_s_per_image"] is None


def test_the_job_record_totals_the_stats_and_lists_failures_as_dicts():
    spec = JobSpec.model_validate(
        {"input": {"uri": "in.parquet"}, "model": {"name": "tiny"}, "output": {"uri": "out"}}
    )
    shard = {
        "shard": "000000000000-abcdef01",
        "rows": 4,
        "ok": 2,
        "errors": 2,
        "first_ordinal": 0,
        "failures": [("prompt is null", 2)],  # as Arrow's map column gives it back
        "generate_s": 1.0,
        "encode_s": 0.1,
        "committed_at": 5.0,
        "generated_at": [1.0, 2.0],
    }
    record = build_job_record(
        spec,
        started_at="s",
        finished_at="f",
        wall_time_s=2.0,
        resumed=False,
        input_files=1,
        input_rows=4,
        planned_images=4,
        shards={shard["shard"]: shard},
        written_this_run=4,
    )
    assert record["stats"] == {
        "failures_by_reason": {"prompt is null": 2},
        "generate_s": 1.0,
        "encode_s": 0.1,
        "gpu_s_per_image": 0.5,
    }
    assert record["shards"][0]["failures"] == {"prompt is null": 2}
    assert "committed_at" not in record["shards"][0]


def test_the_encoder_times_each_image():
    import numpy as np

    from koala_batch.stages.encode import ImageEncoder

    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    encoded = ImageEncoder("png", 95, threads=2).encode_all([pixels, pixels])
    assert all(image.seconds > 0 for image in encoded)


# the run's GPU-hours and cost ---------------------------------------------------------------


def actors(*lives: float) -> list[dict]:
    """Per-actor rows as `generate.busy_summary` gives them (only life_s counts here)."""
    return [
        {"worker": f"w{n}", "life_s": life, "pipeline_s": life / 2} for n, life in enumerate(lives)
    ]


def test_gpu_hours_sum_every_actors_life_and_price_them():
    cost = run_cost(actors(1800.0, 3600.0, 5400.0), 1.0, images=1500, gpu_hour_cost=2.5)
    assert cost == {
        "actors": 3,
        "gpus_per_actor": 1.0,
        "gpu_hours": 3.0,
        "images": 1500,
        "gpu_hour_cost": 2.5,
        "cost": 7.5,
        "cost_per_1000_images": 5.0,
        "note": None,
    }


def test_fractional_gpus_count_their_share():
    cost = run_cost(actors(720.0, 720.0, 720.0, 720.0), 0.25, images=100, gpu_hour_cost=4.0)
    assert cost["gpu_hours"] == pytest.approx(0.2)
    assert cost["cost"] == pytest.approx(0.8)
    assert cost["cost_per_1000_images"] == pytest.approx(8.0)


def test_the_record_agrees_with_itself_after_rounding():
    # 7 s on 3 GPUs: 0.0058333... GPU-hours, recorded to 6 places; the cost is the
    # recorded GPU-hours times the price, not a figure rounded apart from them.
    cost = run_cost(actors(7.0), 3.0, images=3, gpu_hour_cost=3.3)
    assert cost["gpu_hours"] == 0.005833
    assert cost["cost"] == pytest.approx(cost["gpu_hours"] * 3.3, abs=1e-6)
    assert cost["cost_per_1000_images"] == pytest.approx(cost["cost"] / 3 * 1000, rel=1e-6)


def test_without_a_price_gpu_hours_are_recorded_and_no_cost():
    cost = run_cost(actors(3600.0, 1800.0), 2.0, images=10, gpu_hour_cost=None)
    assert cost["gpu_hours"] == 3.0
    assert cost["gpu_hour_cost"] is None
    assert cost["cost"] is None and cost["cost_per_1000_images"] is None
    assert dict(cost_lines(cost))["cost"] == "n/a (compute.gpu_hour_cost not set)"


def test_zero_ok_images_cost_but_no_cost_per_image():
    cost = run_cost(actors(3600.0), 1.0, images=0, gpu_hour_cost=2.0)
    assert cost["cost"] == 2.0
    assert cost["cost_per_1000_images"] is None
    assert dict(cost_lines(cost))["cost/1000 images"] == "n/a (no ok images)"


def test_a_cpu_only_run_records_zero_gpu_hours_and_says_so():
    cost = run_cost(actors(3600.0, 3600.0), 0.0, images=50, gpu_hour_cost=2.0)
    assert cost["gpu_hours"] == 0.0
    assert cost["cost"] is None and cost["cost_per_1000_images"] is None
    assert "CPU-only" in cost["note"]
    assert describe_cost(cost) == "GPU-hours 0 (CPU-only run: 0 GPUs per actor, so no GPU-hours)"


def test_lost_statistics_and_runs_without_actors_invent_nothing():
    lost = run_cost(None, 1.0, images=5, gpu_hour_cost=2.0)
    assert lost["gpu_hours"] is None and lost["cost"] is None and lost["actors"] is None
    assert describe_cost(lost) == (
        "GPU-hours n/a (not measured: the generators' statistics were unavailable)"
    )
    idle = run_cost([], None, images=0, gpu_hour_cost=2.0)
    assert idle["gpu_hours"] == 0.0 and idle["actors"] == 0 and idle["cost"] is None
    assert "nothing was left to generate" in idle["note"]


def test_cost_lines_for_people():
    cost = run_cost(actors(1800.0, 1800.0), 0.5, images=2000, gpu_hour_cost=2.5)
    assert cost_lines(cost) == [
        ("GPU-hours", "0.5 (2 actor(s) x 0.5 GPU, last run)"),
        ("cost", "1.25 at 2.5 per GPU-hour"),
        ("cost/1000 images", "0.625"),
    ]
    big = run_cost(actors(3_600_000.0), 1.0, images=10**6, gpu_hour_cost=2.0)
    assert dict(cost_lines(big))["cost"] == "2,000.00 at 2 per GPU-hour"


@pytest.mark.parametrize(
    "section", [None, {}, "free", {"cost": 3}, {"gpu_hours": "1.5"}, {"gpu_hours": 1, "cost": []}]
)
def test_records_without_a_cost_section_show_nothing(section):
    assert cost_lines(section) == []
    assert describe_cost(section) is None
