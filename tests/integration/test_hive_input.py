"""A job on hive-partitioned input: partition keys as passthrough and seed columns."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import koala_batch
from koala_batch.config import spec_from_dict
from koala_batch.keys import derived_seed
from koala_batch.verify import verify_output
from tests.conftest import tiny_spec
from tests.integration.conftest import start_local_ray

pytestmark = pytest.mark.usefixtures("ray_local")

JOB_SEED = 7
# path below the input root -> the ids of its rows
FILES = {
    "date=2026-11-01/s=40/part-0.parquet": ["kite-red", "kite-blue"],
    "date=2026-11-02/s=__HIVE_DEFAULT_PARTITION__/part-0.parquet": ["kite-green"],
}


@pytest.fixture(scope="module")
def hive_job(tmp_path_factory, model_cache):
    """One job over a partitioned tree: `date` passed through, `s` the seed column."""
    root = tmp_path_factory.mktemp("hive")
    for relative, ids in FILES.items():
        path = root / "in" / relative
        path.parent.mkdir(parents=True)
        pq.write_table(pa.table({"id": ids, "prompt": [f"a {i}" for i in ids]}), path)
    spec = tiny_spec(
        str(root / "in"),
        str(root / "out"),
        input={"id_column": "id", "seed_column": "s", "passthrough_columns": ["date"]},
        generation={"images_per_prompt": 2, "seed": JOB_SEED},
    )
    start_local_ray()
    record = koala_batch.run(spec)
    manifests = sorted((root / "out" / "manifests").glob("*.parquet"))
    rows = pa.concat_tables([pq.read_table(path) for path in manifests])
    return spec, root / "out", record, rows


def test_every_image_is_committed(hive_job):
    _, _, record, rows = hive_job
    assert record["counts"]["images_committed"] == 6
    assert rows.column("status").to_pylist() == ["ok"] * 6


def test_the_partition_key_passes_through_to_the_manifest(hive_job):
    _, _, _, rows = hive_job
    assert rows.schema.field("date").type == pa.string()
    dates = {row["id"]: row["date"] for row in rows.to_pylist()}
    assert dates == {
        "kite-red": "2026-11-01",
        "kite-blue": "2026-11-01",
        "kite-green": "2026-11-02",
    }
    assert "s" not in rows.column_names  # a role column, not passed through


def test_the_partition_key_seeds_its_rows_and_null_falls_back_to_derived(hive_job):
    _, _, _, rows = hive_job
    for row in rows.to_pylist():
        if row["id"] == "kite-green":  # s=__HIVE_DEFAULT_PARTITION__
            assert row["seed"] == derived_seed(JOB_SEED, row["id"], row["image_index"])
        else:
            assert row["seed"] == 40 + row["image_index"]


def test_verify_reads_the_partitions_as_the_job_did(hive_job):
    spec, output, _, _ = hive_job
    report = verify_output(str(output), spec=spec_from_dict(spec))
    assert report.ok, report.format()
