"""Storage faults: transient ones are retried and change nothing; a permanent one fails the
job with nothing partial visible, and a clean rerun completes it exactly once.

The faults come from `tests.faults.FaultyFileSystem`, injected through
`run(spec, Substitutes(input_filesystem=..., output_filesystem=...))`; it counts faults
across the driver and the Ray workers it is pickled to.
"""

from __future__ import annotations

import io
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from ray import cloudpickle

import koala_batch
import tests.faults
from koala_batch import JobFailedError, Substitutes
from tests.conftest import SAMPLE_PROMPTS
from tests.faults import FaultyFileSystem
from tests.integration.conftest import start_local_ray
from tests.integration.test_job_s3 import read_output, s3_spec, upload_table

# Ray workers cannot import `tests`: ship the wrapper's module by value with it.
cloudpickle.register_pickle_by_value(tests.faults)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

TRANSIENT = 3  # faults per kind (reads, writes); koala_batch tries each operation 5 times
PROMPTS = 12


@pytest.fixture(scope="module")
def fault_bucket(s3_server, model_cache):
    """A bucket with 12 prompts in two Parquet files (several row groups, so several
    read tasks), and the output of a clean run of the spec under out/clean."""
    start_local_ray()
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    fs = s3_server.filesystem()
    fs.mkdir(bucket)
    table = pq.read_table(SAMPLE_PROMPTS).slice(0, PROMPTS)
    upload_table(fs, f"{bucket}/prompts/part-0.parquet", table.slice(0, 5), row_group_size=3)
    upload_table(fs, f"{bucket}/prompts/part-1.parquet", table.slice(5), row_group_size=4)
    koala_batch.run(fault_spec(s3_server, bucket, "out/clean"))
    return bucket


def fault_spec(s3_server, bucket: str, output_prefix: str) -> dict:
    # 12 images, pipeline calls of 4, shards of 4: three shards, each written by a task.
    return s3_spec(s3_server, bucket, output_prefix, output={"rows_per_shard": 4})


def outputs_by_key(fs, prefix: str) -> tuple[dict[str, dict], dict[str, bytes], dict]:
    manifest, members, record = read_output(fs, prefix)
    rows = {row["key"]: row for row in manifest.to_pylist()}
    assert len(rows) == manifest.num_rows, f"{prefix}: a key appears twice"
    return rows, members, record


def assert_same_images(fs, bucket: str, prefix: str) -> None:
    """The output under `prefix` holds what the clean run holds: keys, seeds, images."""
    clean_rows, clean_members, _ = outputs_by_key(fs, f"{bucket}/out/clean")
    rows, members, record = outputs_by_key(fs, f"{bucket}/{prefix}")
    assert record["counts"]["images_ok"] == PROMPTS
    assert rows.keys() == clean_rows.keys()
    identity = (
        "id",
        "image_index",
        "seed",
        "prompt",
        "status",
        "member",
        "source",
        "row_index",
        "ordinal",
        "category",
    )
    for key, clean in clean_rows.items():
        row = rows[key]
        assert {f: row[f] for f in identity} == {f: clean[f] for f in identity}, key
        assert row["status"] == "ok"
        if row["sha256"] != clean["sha256"]:
            # Same spec and threads give identical bytes unless Ray grouped the rows into
            # other pipeline calls; then batched float math may move a pixel by a level.
            ours = np.asarray(Image.open(io.BytesIO(members[row["member"]])), dtype=np.int16)
            theirs = np.asarray(
                Image.open(io.BytesIO(clean_members[row["member"]])), dtype=np.int16
            )
            assert np.abs(ours - theirs).max() <= 2, key
            assert np.mean(ours != theirs) < 0.01, key
    # Every tar member belongs to a committed row: nothing extra, nothing missing.
    expected = {row["member"] for row in rows.values()} | {f"{key}.json" for key in rows}
    assert set(members) == expected


def assert_faults_retried(faulty: FaultyFileSystem, kind: str, in_workers: bool) -> None:
    """`TRANSIENT` faults of `kind` were injected, and each faulted operation then succeeded."""
    operations = faulty.operations()
    faulted = [
        (i, op)
        for i, op in enumerate(operations)
        if op["kind"] == kind and op["fault"] == "transient"
    ]
    assert len(faulted) == TRANSIENT, faulted
    for index, op in faulted:
        assert any(
            later["op"] == op["op"] and later["paths"] == op["paths"] and later["fault"] is None
            for later in operations[index + 1 :]
        ), f"{op['op']} {op['paths']} faulted and was never retried"
    driver = faulty.options["owner_pid"]
    if in_workers:
        assert all(op["pid"] != driver for _, op in faulted), faulted


@pytest.mark.parametrize("scope", ["anywhere", "workers"])
def test_transient_faults_are_retried_and_change_nothing(s3_server, fault_bucket, tmp_path, scope):
    """The first 3 reads and 3 writes of input and output fail with a connection error:
    in scope "anywhere" those are the driver's (listing the input, claiming the output),
    in scope "workers" those of the Ray read and write tasks."""
    faulty_in = FaultyFileSystem(
        s3_server.filesystem(), tmp_path / "in-faults", transient_reads=TRANSIENT, scope=scope
    )
    faulty_out = FaultyFileSystem(
        s3_server.filesystem(),
        tmp_path / "out-faults",
        transient_reads=TRANSIENT,
        transient_writes=TRANSIENT,
        scope=scope,
    )
    prefix = f"out/transient-{scope}"

    record = koala_batch.run(
        fault_spec(s3_server, fault_bucket, prefix),
        Substitutes(input_filesystem=faulty_in, output_filesystem=faulty_out),
    )

    assert faulty_in.consumed() == {"read": TRANSIENT, "write": 0}
    assert faulty_out.consumed() == {"read": TRANSIENT, "write": TRANSIENT}
    in_workers = scope == "workers"
    assert_faults_retried(faulty_in, "read", in_workers)
    assert_faults_retried(faulty_out, "read", in_workers)
    assert_faults_retried(faulty_out, "write", in_workers)
    if in_workers:
        # The read tasks' row-group reads, the write tasks' tar uploads and manifest writes.
        assert {op["op"] for op in faulty_in.operations() if op["fault"]} == {"open(rb)"}
        written = {
            (op["op"], op["paths"][0].rsplit("/", 2)[-2])
            for op in faulty_out.operations()
            if op["fault"] and op["kind"] == "write"
        }
        assert written <= {("put_file", "shards"), ("pipe_file", "manifests")}, written

    assert record["counts"]["images_ok"] == PROMPTS
    assert not record["resumed"]
    assert_same_images(s3_server.filesystem(), fault_bucket, prefix)


def test_permanent_manifest_failure_fails_clearly_then_rerun_completes(
    s3_server, fault_bucket, tmp_path
):
    fs = s3_server.filesystem()
    prefix = "out/permanent"
    output = f"{fault_bucket}/{prefix}"
    spec = fault_spec(s3_server, fault_bucket, prefix)
    faulty_out = FaultyFileSystem(
        s3_server.filesystem(), tmp_path / "out-faults", permanent_writes="/manifests/"
    )

    with pytest.raises(JobFailedError) as failure:
        koala_batch.run(spec, Substitutes(output_filesystem=faulty_out))

    # Clear: one line with the worker's PermissionError and the storage layer's note
    # naming the operation and the URL, not Ray's wrapped tracebacks.
    message = str(failure.value)
    assert "PermissionError: injected permanent fault" in message, message
    assert f"koala-batch storage: write s3://{output}/manifests/" in message, message
    assert "failed (not retried)" in message, message
    assert "Traceback" not in message and "rerun the same spec to resume" in message
    # Refused is an answer, not a fault: never retried by the storage layer.
    refused = [op for op in faulty_out.operations() if op["fault"] == "permanent"]
    assert refused
    assert all("/manifests/" in op["paths"][0] for op in refused)
    per_path = {}
    for op in refused:
        per_path[op["paths"][0]] = per_path.get(op["paths"][0], 0) + 1
    assert max(per_path.values()) == 1, per_path

    # Nothing partial is visible: no manifest (so no committed shard) and no _SUCCESS.
    assert fs.exists(f"{output}/_job.json")
    assert fs.glob(f"{output}/manifests/*") == []
    assert not fs.exists(f"{output}/_SUCCESS")
    # The tar of each refused shard was uploaded first: a leftover, invisible to readers
    # that trust manifests.
    leftovers = sorted(fs.glob(f"{output}/shards/*"))
    for path in per_path:
        shard = path.rsplit("/", 1)[-1][: -len(".parquet")]
        assert f"{output}/shards/{shard}.tar" in leftovers, (shard, leftovers)

    # A clean rerun on the same output resumes, drops the leftovers, completes exactly once.
    record = koala_batch.run(spec)
    fs = s3_server.filesystem()  # a fresh client: no listings cached from before the rerun
    assert record["resumed"]
    assert record["counts"]["images_written_this_run"] == PROMPTS
    manifest, members, _ = read_output(fs, output)  # fails if a member is in two tars
    ids = sorted(
        zip(
            manifest.column("id").to_pylist(),
            manifest.column("image_index").to_pylist(),
            strict=True,
        )
    )
    expected_ids = pq.read_table(SAMPLE_PROMPTS).slice(0, PROMPTS).column("id").to_pylist()
    assert ids == sorted((row_id, 0) for row_id in expected_ids)
    committed = {shard["shard"] for shard in record["shards"]}
    tars = {path.rsplit("/", 1)[-1][: -len(".tar")] for path in fs.glob(f"{output}/shards/*")}
    assert tars == committed, f"leftovers {leftovers}; tars now {tars}"
    assert_same_images(fs, fault_bucket, prefix)
