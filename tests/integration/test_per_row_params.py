"""Per-row generation parameters through a whole job: sizes, steps, guidance and image
counts that differ by row (and bad values among them), in one run whose output every
test here inspects."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import koala_batch
from koala_batch.config import spec_from_dict
from koala_batch.read import plan_input
from koala_batch.verify import verify_output
from tests.conftest import tiny_spec, write_prompt_table
from tests.integration.conftest import start_local_ray

# id: (width, height, steps, guidance, images, seed, big) as the input gives them
ROWS = {
    "plain": (None, None, None, None, None, None, 1),
    "small": (32, 48, 1, 2.0, 1, 2**63 - 1, 2),
    "wide": (48, 32, 3, None, 3, None, 3),
    "small-too": (32, 48, 1, 2.0, 2, None, 4),
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


@pytest.fixture(scope="module")
def job(tmp_path_factory, model_cache):
    tmp_path = tmp_path_factory.mktemp("per-row")
    columns = list(zip(*ROWS.values(), strict=True))
    table = write_prompt_table(
        tmp_path / "in.parquet",
        [f"a picture of {row_id}" for row_id in ROWS],
        id=list(ROWS),
        w=pa.array(columns[0], pa.int64()),
        h=pa.array(columns[1], pa.int32()),
        s=pa.array(columns[2], pa.int64()),
        g=pa.array(columns[3], pa.float64()),
        n=pa.array(columns[4], pa.int64()),
        seed=pa.array(columns[5], pa.uint64()),
        big=pa.array(columns[6], pa.uint64()),
    )
    output = tmp_path / "out"
    raw = tiny_spec(
        str(table),
        str(output),
        input={
            "id_column": "id",
            "width_column": "w",
            "height_column": "h",
            "steps_column": "s",
            "guidance_scale_column": "g",
            "images_per_prompt_column": "n",
            "seed_column": "seed",
            "passthrough_columns": ["big"],
        },
        generation={"images_per_prompt": 2},
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
    assert by_pair[("wide", 2)] == 2 * 1000 + 2  # row ordinal 2


def test_output_verifies_against_the_spec(job):
    report = verify_output(str(job["output"]), spec=job["spec"])
    assert report.problems == [], report.problems
    assert report.expected_images == 17 and report.missing_inputs == 0
