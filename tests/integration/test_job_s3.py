"""Parquet in S3 -> job on real Ray -> WebDataset shards, manifests and _SUCCESS in S3."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image

import koala_batch
from koala_batch.keys import derived_seed, sample_key
from tests.conftest import tiny_spec

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


def upload_table(fs, url: str, table: pa.Table, row_group_size: int | None = None) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    fs.pipe_file(url, buffer.getvalue())


def read_output(fs, prefix: str) -> tuple[pa.Table, dict[str, bytes], dict]:
    """(all manifests, tar members by name, job record) of an output prefix."""
    manifests = [
        pq.read_table(io.BytesIO(fs.cat_file(path)))
        for path in sorted(fs.glob(f"{prefix}/manifests/*.parquet"))
    ]
    members: dict[str, bytes] = {}
    for path in sorted(fs.glob(f"{prefix}/shards/*.tar")):
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path))) as archive:
            for info in archive.getmembers():
                assert info.name not in members, f"{info.name} appears in two tars"
                members[info.name] = archive.extractfile(info).read()
    record = json.loads(fs.cat_file(f"{prefix}/_SUCCESS"))
    return pa.concat_tables(manifests), members, record


@pytest.fixture
def s3_prompts(s3_server, s3_bucket, sample_prompts):
    """The 64 sample prompts split over two Parquet files under one S3 prefix."""
    fs = s3_server.filesystem()
    table = sample_prompts.slice(0, 24)
    upload_table(fs, f"{s3_bucket}/prompts/part-0.parquet", table.slice(0, 10), row_group_size=4)
    upload_table(fs, f"{s3_bucket}/prompts/part-1.parquet", table.slice(10), row_group_size=7)
    return table


def s3_spec(s3_server, bucket: str, output_prefix: str, **sections) -> dict:
    spec = tiny_spec(f"s3://{bucket}/prompts/", f"s3://{bucket}/{output_prefix}", **sections)
    spec["input"].update(
        id_column="id", passthrough_columns=["category"], storage_options=s3_server.storage_options
    )
    spec["output"]["storage_options"] = s3_server.storage_options
    return spec


def test_s3_job_writes_complete_shards_and_record(s3_server, s3_bucket, s3_prompts, tmp_path):
    spec = s3_spec(
        s3_server,
        s3_bucket,
        "out/run1",
        generation={"images_per_prompt": 2},
        output={"rows_per_shard": 10},
    )
    record = koala_batch.run(spec)

    fs = s3_server.filesystem()
    manifest, members, stored = read_output(fs, f"{s3_bucket}/out/run1")
    assert stored["counts"] == record["counts"]
    assert record["counts"]["images_planned"] == 48
    assert record["counts"]["images_ok"] == 48
    assert manifest.num_rows == 48

    # Every input row exactly once per image index.
    pairs = sorted(
        zip(
            manifest.column("id").to_pylist(),
            manifest.column("image_index").to_pylist(),
            strict=True,
        )
    )
    expected = sorted(
        (row_id, i) for row_id in s3_prompts.column("id").to_pylist() for i in range(2)
    )
    assert pairs == expected
    assert len(set(manifest.column("key").to_pylist())) == 48

    # Shards: numbered, at most rows_per_shard, listed in the record with their paths.
    assert sorted(manifest.column("shard").unique().to_pylist()) == sorted(
        shard["shard"] for shard in record["shards"]
    )
    assert all(shard["rows"] <= 10 for shard in record["shards"])
    for shard in record["shards"]:
        assert fs.exists(shard["tar"]) and fs.exists(shard["manifest"])
    assert stored["spec"]["output"]["storage_options"]["secret"] == "**********"
    assert s3_server.secret not in json.dumps(stored)
    assert s3_server.key not in json.dumps(stored)

    for row in manifest.to_pylist():
        assert row["key"] == sample_key(row["id"], row["image_index"])
        assert row["seed"] == derived_seed(7, row["id"], row["image_index"])
        data = members[row["member"]]
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert len(data) == row["bytes"]
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.size == (64, 64)
        sidecar = json.loads(members[f"{row['key']}.json"])
        assert sidecar["id"] == row["id"] and sidecar["seed"] == row["seed"]
        assert sidecar["category"] == row["category"]

    # webdataset reads the shards as they are, copied down from S3.
    local = []
    for index, shard in enumerate(record["shards"]):
        target = tmp_path / f"{index}.tar"
        target.write_bytes(fs.cat_file(shard["tar"]))
        local.append(str(target))
    samples = list(webdataset.WebDataset(local, shardshuffle=False).decode("pil"))
    assert sorted((s["json"]["id"], s["json"]["image_index"]) for s in samples) == expected
    assert all(sample["png"].size == (64, 64) for sample in samples)


def test_two_runs_and_batch_sizes_agree(s3_server, s3_bucket, s3_prompts):
    """Same spec twice: same keys, seeds, images. Batch size 1 vs 4: same keys and seeds."""
    fs = s3_server.filesystem()
    outputs = {}
    for name, batch_size in (("a", 4), ("b", 4), ("c", 1)):
        spec = s3_spec(s3_server, s3_bucket, f"out/{name}", compute={"batch_size": batch_size})
        koala_batch.run(spec)
        manifest, members, _ = read_output(fs, f"{s3_bucket}/out/{name}")
        outputs[name] = {
            row["key"]: (row["seed"], members[row["member"]]) for row in manifest.to_pylist()
        }

    assert outputs["a"].keys() == outputs["b"].keys() == outputs["c"].keys()
    for key, (seed, png) in outputs["a"].items():
        assert outputs["b"][key][0] == seed == outputs["c"][key][0]
        same_batch = np.asarray(Image.open(io.BytesIO(outputs["b"][key][1])), dtype=np.int16)
        other_batch = np.asarray(Image.open(io.BytesIO(outputs["c"][key][1])), dtype=np.int16)
        first = np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)
        # Same batch composition and threads: identical pixels.
        assert np.array_equal(first, same_batch)
        # Another batch size may flip a few pixels by one level (batched float math).
        assert np.abs(first - other_batch).max() <= 2
        assert np.mean(first != other_batch) < 0.01
