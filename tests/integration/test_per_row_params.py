"""Per-row generation parameters through a whole job: sizes, steps, guidance and image
counts that differ by row (and bad values among them), in one run whose output every
test here inspects.

The input is hive-partitioned: the width and images_per_prompt columns are the `w=` and
`n=` partition keys of each file's path (`__HIVE_DEFAULT_PARTITION__` for null), and the
`date=` partition key is passed through to the manifest."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import koala_batch
from koala_batch.inputs.files import HIVE_NULL, plan_input
from koala_batch.keys import derived_seed
from koala_batch.output.verify import verify_output
from koala_batch.spec import spec_from_dict
from tests.conftest import tiny_spec, write_prompt_table
from tests.integration.conftest import start_local_ray

pytestmark = pytest.mark.slow

# id: (width, height, steps, guidance, images, seed, big) as the input gives them
ROWS = {
    "plain": (None, None, None, None, None, None, 1),
    "small": (32, 48, 1, 2.0, 1, 2**63 - 1, 2),
    "wide": (48, 32, 3, None, 3, None, 3),
    "small-too": (32, 48, 1, 2.0, 2, 40, 4),
    "bad-width": (100, None, None, None, None, None, 5),
    "bad-count": (None, None, None, None, 0, None, 6),
    "bad-steps": (None, None, 0, None, None, None, 7),
    "bad-seed": (None, None, None, None, None, 2**63, 8),
    "bad-big": (None, None, None, None, None, None, 2**64 - 1),
}
EXPECTED_IMAGES = {
    "plain": 2,
    "small": 1,
    "wide": 3,
    "small-too": 2,
    "bad-width": 2,
    "bad-count": 1,
    "bad-steps": 2,
    "bad-seed": 2,
    "bad-big": 2,
}
EXPECTED_ERRORS = {
    "bad-width": "width column 'w': value 100 is not a multiple of 8",
    "bad-count": "images_per_prompt column 'n': value 0 is outside 1 to 1000",
    "bad-steps": "steps column 's': value 0 is outside 1 to 1000",
    "bad-seed": f"seed column 'seed': seed {2**63} is outside 0 to 2**63-1",
    "bad-big": f"passthrough column 'big': value {2**64 - 1} does not fit",
}
DEFAULTS = (64, 64, 2, 5.0)  # tiny_spec's width, height, steps, guidance
JOB_SEED = 7
# id: its `date=` partition; the rows of 2026-11-01 sort first (row ordinals 0 to 2)
DATES = {
    row_id: "2026-11-01" if row_id in ("small", "small-too", "wide") else "2026-11-02"
    for row_id in ROWS
}


def partition_files() -> dict[str, list[str]]:
    """The ids of each input file's rows, by its path below the input root: the file of
    one (date, width, images) partition, those two parameters its `w=` and `n=` keys."""
    files: dict[str, list[str]] = {}
    for row_id, (width, _, _, _, images, _, _) in ROWS.items():
        keys = [("date", DATES[row_id]), ("w", width), ("n", images)]
        directory = "/".join(f"{key}={HIVE_NULL if v is None else v}" for key, v in keys)
        files.setdefault(f"{directory}/part-0.parquet", []).append(row_id)
    return files


@pytest.fixture(scope="module")
def job(tmp_path_factory, model_cache):
    tmp_path = tmp_path_factory.mktemp("per-row")
    for relative, ids in partition_files().items():
        columns = list(zip(*(ROWS[row_id] for row_id in ids), strict=True))
        write_prompt_table(  # w and n are the file's partition keys, not its columns
            tmp_path / "in" / relative,
            [f"a picture of {row_id}" for row_id in ids],
            id=ids,
            h=pa.array(columns[1], pa.int32()),
            s=pa.array(columns[2], pa.int64()),
            g=pa.array(columns[3], pa.float64()),
            seed=pa.array(columns[5], pa.uint64()),
            big=pa.array(columns[6], pa.uint64()),
        )
    output = tmp_path / "out"
    raw = tiny_spec(
        str(tmp_path / "in"),
        str(output),
        input={
            "id_column": "id",
            "width_column": "w",
            "height_column": "h",
            "steps_column": "s",
            "guidance_scale_column": "g",
            "images_per_prompt_column": "n",
            "seed_column": "seed",
            "passthrough_columns": ["big", "date"],
        },
        generation={"images_per_prompt": 2, "seed": JOB_SEED},
        output={"max_failed_fraction": 0.9, "rows_per_shard": 6},
    )
    start_local_ray()
    record = koala_batch.run(raw)
    manifests = [pq.read_table(path) for path in sorted((output / "manifests").glob("*.parquet"))]
    return {
        "spec": spec_from_dict(raw),
        "record": record,
        "output": output,
        "manifests": manifests,
        "rows": [row for manifest in manifests for row in manifest.to_pylist()],
    }


def members(output) -> dict[str, bytes]:
    found = {}
    for path in sorted((output / "shards").glob("*.tar")):
        with tarfile.open(path) as archive:
            for member in archive.getmembers():
                found[member.name] = archive.extractfile(member).read()
    return found


def test_counts_match_the_planned_images(job):
    planned = plan_input(
        job["spec"].input, images_per_prompt=job["spec"].generation.images_per_prompt
    ).planned_images
    counts = job["record"]["counts"]

    assert planned == sum(EXPECTED_IMAGES.values()) == 17
    assert counts["images_planned"] == counts["images_committed"] == planned
    assert counts["images_failed"] == sum(EXPECTED_IMAGES[row_id] for row_id in EXPECTED_ERRORS)
    per_id: dict[str, list[int]] = {}
    for row in job["rows"]:
        per_id.setdefault(row["id"], []).append(row["image_index"])
    assert {row_id: sorted(indices) for row_id, indices in per_id.items()} == {
        row_id: list(range(count)) for row_id, count in EXPECTED_IMAGES.items()
    }


def test_manifest_rows_carry_each_rows_parameters(job):
    for row in job["rows"]:
        given = ROWS[row["id"]][:4]
        if row["id"] in EXPECTED_ERRORS:
            assert row["status"] == "error"
            continue
        expected = tuple(
            default if value is None else value
            for value, default in zip(given, DEFAULTS, strict=True)
        )
        got = (row["width"], row["height"], row["steps"], row["guidance_scale"])
        assert row["status"] == "ok", row["error"]
        assert got == expected, row["id"]


def test_error_rows_name_the_column(job):
    for row in job["rows"]:
        if row["id"] in EXPECTED_ERRORS:
            assert row["error"].startswith(EXPECTED_ERRORS[row["id"]]), row["error"]
        else:
            assert row["error"] is None


def test_images_have_their_rows_size(job):
    found = members(job["output"])
    ok = [row for row in job["rows"] if row["status"] == "ok"]
    assert {(row["width"], row["height"]) for row in ok} == {(64, 64), (32, 48), (48, 32)}
    for row in ok:
        with Image.open(io.BytesIO(found[row["member"]])) as image:
            assert image.size == (row["width"], row["height"]), row["id"]


def test_sidecars_load_with_seeds_every_reader_takes(job):
    found = members(job["output"])
    sidecars = [json.loads(data) for name, data in found.items() if name.endswith(".json")]
    by_key = {row["key"]: row for row in job["rows"]}

    assert len(sidecars) == sum(1 for row in job["rows"] if row["status"] == "ok")
    for sidecar in sidecars:
        row = by_key[sidecar["key"]]
        assert 0 <= sidecar["seed"] < 2**63
        assert sidecar["seed"] == row["seed"]
        assert (sidecar["width"], sidecar["height"], sidecar["steps"]) == (
            row["width"],
            row["height"],
            row["steps"],
        )
    small = [sidecar for sidecar in sidecars if sidecar["id"] == "small"]
    assert [sidecar["seed"] for sidecar in small] == [2**63 - 1]


def test_manifest_types_fit_every_reader(job):
    for manifest in job["manifests"]:
        schema = manifest.schema
        assert schema.field("seed").type == pa.int64()
        assert schema.field("big").type == pa.int64()
        assert schema.field("generated_at").type == pa.timestamp("us", tz="UTC")
        assert not any(field.type == pa.uint64() for field in schema)
        manifest.to_pandas()  # no overflow on the way to readers
    bigs = {row["id"]: row["big"] for row in job["rows"]}
    assert bigs["plain"] == 1 and bigs["bad-big"] is None


def test_ordinals_are_unique_and_use_the_fixed_stride(job):
    ordinals = [row["ordinal"] for row in job["rows"]]
    assert len(set(ordinals)) == len(ordinals)
    by_pair = {(row["id"], row["image_index"]): row["ordinal"] for row in job["rows"]}
    # row ordinal 2: the third row in path order, after small's and small-too's files
    in_path_order = [ids for _, ids in sorted(partition_files().items())]
    assert in_path_order[:3] == [["small"], ["small-too"], ["wide"]]
    assert by_pair[("wide", 2)] == 2 * 1000 + 2


def test_the_input_is_split_over_partitions_with_nulls(job):
    files = partition_files()
    assert len(files) == 6
    assert f"date=2026-11-02/w={HIVE_NULL}/n={HIVE_NULL}/part-0.parquet" in files
    assert f"date=2026-11-02/w=100/n={HIVE_NULL}/part-0.parquet" in files
    assert f"date=2026-11-02/w={HIVE_NULL}/n=0/part-0.parquet" in files


def test_the_partition_key_passes_through_to_the_manifest(job):
    for manifest in job["manifests"]:
        assert manifest.schema.field("date").type == pa.string()
        # role columns, not passed through
        assert "w" not in manifest.column_names and "n" not in manifest.column_names
    dates = {(row["id"], row["image_index"]): row["date"] for row in job["rows"]}
    assert dates == {
        (row_id, index): DATES[row_id]
        for row_id, count in EXPECTED_IMAGES.items()
        for index in range(count)
    }
    assert {row["date"] for row in job["rows"]} == {"2026-11-01", "2026-11-02"}


def test_the_seed_column_seeds_its_rows_and_null_falls_back_to_derived(job):
    ok = [row for row in job["rows"] if row["status"] == "ok"]
    assert {row["id"] for row in ok} == {"plain", "small", "wide", "small-too"}
    for row in ok:
        given = ROWS[row["id"]][5]
        if given is None:
            assert row["seed"] == derived_seed(JOB_SEED, row["id"], row["image_index"])
        else:
            assert row["seed"] == given + row["image_index"]
    seeds = {(row["id"], row["image_index"]): row["seed"] for row in ok}
    assert (seeds[("small-too", 0)], seeds[("small-too", 1)]) == (40, 41)


def test_output_verifies_against_the_spec(job):
    report = verify_output(str(job["output"]), spec=job["spec"])
    assert report.problems == [], report.problems
    assert report.ok, report.format()
    assert report.expected_images == 17 and report.missing_inputs == 0
