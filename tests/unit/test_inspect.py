"""`koala-batch inspect` on small outputs built here, in each output format."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from koala_batch.cli.inspect import (
    CONTACT_SHEET,
    THROUGHPUT,
    contact_sheet,
    default_out_dir,
    format_summary,
    inspect_output,
    load_output,
    read_images,
    sample_images,
    sheet_size,
    summarize,
    throughput_plot,
)
from koala_batch.errors import UsageError
from koala_batch.keys import sample_key, shard_name
from koala_batch.output.layout import (
    FILES,
    IMAGE_COLUMN,
    IMAGE_TYPE,
    PARQUET,
    SUCCESS_FILE,
    WEBDATASET,
    data_metadata,
    folder_file_path,
    image_member,
    manifest_path,
    parquet_path,
    stats_metadata,
    tar_path,
)
from koala_batch.output.stats import run_cost, shard_stats
from koala_batch.schemas import Col
from koala_batch.storage import Storage

ROWS_PER_SHARD = 4


def png(value: int, size: int = 16) -> bytes:
    pixels = np.full((size, size, 3), value % 256, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_output(root: Path, output_format: str, shards: int = 2) -> dict[str, bytes]:
    """An output of `shards` committed shards of ROWS_PER_SHARD rows, the last row of each
    failed; returns every ok image by key."""
    storage = Storage(str(root))
    images: dict[str, bytes] = {}
    for number in range(shards):
        first = number * ROWS_PER_SHARD
        ordinals = list(range(first, first + ROWS_PER_SHARD))
        keys = [sample_key(f"row-{ordinal}", 0) for ordinal in ordinals]
        ok = [ordinal != ordinals[-1] for ordinal in ordinals]
        data = [png(ordinal) if good else None for ordinal, good in zip(ordinals, ok, strict=True)]
        members = [
            image_member(key, "png") if good else None for key, good in zip(keys, ok, strict=True)
        ]
        manifest = pa.table(
            {
                Col.KEY: keys,
                Col.PROMPT: [f"a photo of thing number {ordinal}" for ordinal in ordinals],
                Col.STATUS: ["ok" if good else "error" for good in ok],
                Col.ERROR: [None if good else "RuntimeError: injected" for good in ok],
                Col.MEMBER: members,
                Col.BYTES: pa.array([len(d) if d else 0 for d in data], pa.int64()),
                Col.ORDINAL: pa.array(ordinals, pa.int64()),
            }
        )
        shard = shard_name(first, keys)
        kept = [(m, d) for m, d in zip(members, data, strict=True) if d is not None]
        if output_format == WEBDATASET:
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
                for member, image in kept:
                    info = tarfile.TarInfo(member)
                    info.size = len(image)
                    archive.addfile(info, io.BytesIO(image))
                    sidecar = tarfile.TarInfo(member.replace(".png", ".json"))
                    sidecar.size = 2
                    archive.addfile(sidecar, io.BytesIO(b"{}"))
            storage.write_bytes(tar_path(shard), buffer.getvalue())
            size = len(buffer.getvalue())
        elif output_format == PARQUET:
            table = pa.table(
                {
                    IMAGE_COLUMN: pa.array([{"bytes": d, "path": m} for m, d in kept], IMAGE_TYPE),
                    Col.KEY: [k for k, d in zip(keys, data, strict=True) if d is not None],
                }
            )
            buffer = io.BytesIO()
            pq.write_table(table, buffer)
            storage.write_bytes(parquet_path(shard), buffer.getvalue())
            size = len(buffer.getvalue())
        else:
            for member, image in kept:
                storage.write_bytes(folder_file_path(shard, member), image)
            size = 0
        stats = shard_stats(
            manifest,
            generate_s=[0.25] * ROWS_PER_SHARD,
            encode_s=[0.01] * ROWS_PER_SHARD,
            generated_at=[1000.0 + 10 * number] * ROWS_PER_SHARD,
            committed_at=1005.0 + 10 * number,
        )
        manifest = manifest.replace_schema_metadata(
            {**data_metadata(output_format, size), **stats_metadata(stats)}
        )
        buffer = io.BytesIO()
        pq.write_table(manifest, buffer)
        storage.write_bytes(manifest_path(shard), buffer.getvalue())
        images.update({key: d for key, d in zip(keys, data, strict=True) if d is not None})
    return images


def decoded_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        return image.size


@pytest.mark.parametrize("output_format", [WEBDATASET, PARQUET, FILES])
def test_read_images_reads_every_format(tmp_path, output_format):
    images = write_output(tmp_path / "out", output_format)
    storage = Storage(str(tmp_path / "out"))
    view = load_output(storage)
    assert {shard.output_format for shard in view.shards} == {output_format}

    found: dict[str, bytes] = {}
    for shard in view.shards:
        rows = [row for row in shard.rows.to_pylist() if row[Col.STATUS] == "ok"]
        found.update(read_images(storage, shard.name, shard.output_format, rows))
    assert found == images


def test_summary_counts_failures_seconds_and_rate(tmp_path):
    write_output(tmp_path / "out", WEBDATASET, shards=3)
    summary = summarize(load_output(Storage(str(tmp_path / "out"))))

    assert summary["images"] == 12 and summary["ok"] == 9 and summary["failed"] == 3
    assert summary["failures"] == {"RuntimeError": 3}
    assert summary["shards"] == 3 and summary["formats"] == [WEBDATASET]
    # 12 rows from the first image (t=1000) to the last commit (t=1025)
    assert summary["span_s"] == 25.0 and summary["images_per_s"] == pytest.approx(12 / 25)
    assert summary["gpu_s_per_image"] == pytest.approx(12 * 0.25 / 9)
    listed = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert summary["bytes"] == listed
    table = format_summary(summary)
    assert re.search(r"^images +12$", table, re.MULTILINE)
    assert re.search(r"^  RuntimeError +3$", table, re.MULTILINE)
    assert re.search(r"^GPU-s/image +0\.3333$", table, re.MULTILINE)


def test_the_table_gives_the_last_runs_cost_from_success(tmp_path):
    write_output(tmp_path / "out", WEBDATASET)
    cost = run_cost([{"life_s": 900.0}, {"life_s": 900.0}], 1.0, images=6, gpu_hour_cost=3.0)
    (tmp_path / "out" / SUCCESS_FILE).write_text(json.dumps({"status": "succeeded", "cost": cost}))

    summary = summarize(load_output(Storage(str(tmp_path / "out"))))

    assert summary["cost"] == cost
    table = format_summary(summary)
    assert re.search(r"^GPU-hours +0\.5 \(2 actor\(s\) x 1 GPU, last run\)$", table, re.M)
    assert re.search(r"^cost +1\.5 at 3 per GPU-hour$", table, re.MULTILINE)
    assert re.search(r"^cost/1000 images +250$", table, re.MULTILINE)


@pytest.mark.parametrize("success", [None, '{"status": "succeeded"}', "{not json", "[]"])
def test_without_a_recorded_cost_the_table_shows_none(tmp_path, success):
    write_output(tmp_path / "out", WEBDATASET)
    if success is not None:  # no record, an older one, an unreadable one
        (tmp_path / "out" / SUCCESS_FILE).write_text(success)

    summary = summarize(load_output(Storage(str(tmp_path / "out"))))

    assert summary["cost"] is None
    table = format_summary(summary)
    labels = [line.split("  ")[0] for line in table.splitlines()]
    assert not {"GPU-hours", "cost", "cost/1000 images"} & set(labels)
    assert table.splitlines()[-1].startswith("GPU-s/image")


def test_sampling_is_repeatable_and_takes_ok_images_only(tmp_path):
    images = write_output(tmp_path / "out", WEBDATASET, shards=3)
    storage = Storage(str(tmp_path / "out"))
    view = load_output(storage)

    first = sample_images(storage, view, 5, seed=3)
    assert first == sample_images(storage, view, 5, seed=3)
    assert len(first) == 5 and {data for data, _ in first} <= set(images.values())
    assert all(caption.startswith("a photo of thing number") for _, caption in first)
    # more than there are: every ok image once
    assert len(sample_images(storage, view, 50)) == len(images)


@pytest.mark.parametrize(("count", "tile"), [(1, 192), (5, 192), (9, 192), (6, 64)])
def test_contact_sheet_is_a_png_of_the_grid_size(tmp_path, count, tile):
    images = [(png(i, size=8 + i), "a long prompt " * (i + 1)) for i in range(count)]
    path = tmp_path / "sheet.png"

    size = contact_sheet(images, path, tile=tile)

    assert size == sheet_size(count, tile) == decoded_size(path)
    columns = 3 if count in (5, 6, 9) else 1
    assert size[0] == columns * (tile + 8) + 8


def test_throughput_plot_is_a_png(tmp_path):
    write_output(tmp_path / "out", WEBDATASET, shards=3)
    path = tmp_path / "throughput.png"

    throughput_plot(load_output(Storage(str(tmp_path / "out"))), path, size=(640, 360))

    assert decoded_size(path) == (640, 360)


def test_inspect_writes_both_pictures_and_never_overwrites(tmp_path):
    write_output(tmp_path / "out", PARQUET)
    out = tmp_path / "report"

    result = inspect_output(str(tmp_path / "out"), out, samples=4)

    assert result.summary["images"] == 8
    assert decoded_size(out / CONTACT_SHEET) == sheet_size(4)
    assert decoded_size(out / THROUGHPUT)
    with pytest.raises(UsageError, match="already exist"):
        inspect_output(str(tmp_path / "out"), out)


@pytest.mark.parametrize("below", ["", "deeper"])
def test_inspect_out_that_is_a_file_exits_2_naming_it(tmp_path, capsys, below):
    from koala_batch.cli import main as cli

    write_output(tmp_path / "out", PARQUET)
    in_the_way = tmp_path / "report.txt"
    in_the_way.write_text("mine")
    out = in_the_way / below if below else in_the_way

    code = cli.main(["--log-format", "text", "inspect", str(tmp_path / "out"), "--out", str(out)])

    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"koala-batch: error: --out {out}: a file stands where that folder is needed; give "
        "--out a new or empty folder"
    ]
    assert in_the_way.read_text() == "mine"


def test_inspect_refuses_an_output_without_committed_shards(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no committed shard"):
        inspect_output(str(tmp_path / "empty"), tmp_path / "report")


def test_default_out_dir_is_new_and_named_after_the_output():
    from datetime import UTC, datetime

    path = default_out_dir("s3://bucket/jobs/run-7/", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert path == Path.cwd() / "inspect-run-7-20260102-030405"
