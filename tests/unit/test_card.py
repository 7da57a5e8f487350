"""The dataset card: front matter a Hub reader parses, loading snippets per format."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from koala_batch.output.card import build_card, size_category, write_card
from koala_batch.output.layout import CARD_FILE, FileKind, classify, manifest_path, scan_output
from koala_batch.presets import PRESETS
from koala_batch.schemas import MANIFEST_FIELDS
from koala_batch.spec import JobSpec
from koala_batch.storage import Storage


def make_spec(model: str = "tiny", **output) -> JobSpec:
    return JobSpec.model_validate(
        {
            "input": {"uri": "in.parquet"},
            "model": {"name": model},
            "generation": {"width": 64, "height": 64},
            "output": {"uri": "/data/out", **output},
        }
    )


RECORD = {
    "counts": {
        "input_rows": 10,
        "images_committed": 10,
        "images_ok": 8,
        "images_failed": 2,
        "shards": 3,
    },
    "stats": {"failures_by_reason": {"prompt is null": 2}, "gpu_s_per_image": 0.25},
    "versions": {"torch": "2.13.0"},
    "fingerprint": "abc123",
    "started_at": "2026-01-01T00:00:00+00:00",
    "finished_at": "2026-01-01T00:01:00+00:00",
}
SCHEMA = pa.schema([*MANIFEST_FIELDS, pa.field("category", pa.string())])


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, body = card[4:].partition("\n---\n")
    assert body, "the front matter is not closed"
    return yaml.safe_load(head)


def test_front_matter_parses_with_the_hub_keys():
    meta = front_matter(build_card(RECORD, make_spec(license="cc-by-4.0"), SCHEMA))

    assert meta["license"] == "cc-by-4.0"
    assert meta["task_categories"] == ["text-to-image"]
    assert meta["size_categories"] == ["n<1K"]
    assert "koala-batch" in meta["tags"]
    assert meta["configs"][0]["data_files"][0]["path"] == "shards/*.tar"
    section = meta["koala_batch"]
    assert section["model"] == {
        "name": "tiny",
        "id": "tiny",
        "revision": None,
        "license": "apache-2.0",
    }
    assert section["counts"] == {"images": 10, "ok": 8, "failed": 2, "shards": 3}
    assert section["columns"]["seed"] == "int64"
    assert section["columns"]["category"] == "string"  # passthrough columns too
    assert list(section["columns"]) == SCHEMA.names


def test_the_license_defaults_to_other_and_presets_carry_theirs():
    assert front_matter(build_card(RECORD, make_spec(), SCHEMA))["license"] == "other"
    meta = front_matter(build_card(RECORD, make_spec("koala-lightning-700m"), SCHEMA))
    assert meta["koala_batch"]["model"]["id"] == "etri-vilab/koala-lightning-700m"
    assert meta["koala_batch"]["model"]["license"] == PRESETS["koala-lightning-700m"].license


def test_a_license_that_is_no_license_id_is_refused():
    with pytest.raises(ValueError, match="license"):
        make_spec(license="see: my lawyer")


def test_body_names_the_failures_and_columns():
    card = build_card(RECORD, make_spec(), SCHEMA)
    assert "| prompt is null | 2 |" in card
    assert "| `category` | `string` |" in card
    assert "10 images (8 ok, 2 failed) in 3 shards" in card


@pytest.mark.parametrize(
    ("output_format", "expected", "absent"),
    [
        (
            "webdataset",
            [
                'load_dataset("webdataset", data_files="/data/out/shards/*.tar"',
                'load_dataset("/data/out", split="train")',
                'glob.glob("/data/out/shards/*.tar")',
                'ray.data.read_webdataset("/data/out/shards/")',
                "read_parquet('/data/out/manifests/*.parquet')",
            ],
            [],
        ),
        (
            "parquet",
            [
                'load_dataset("parquet", data_files="/data/out/shards/*.parquet"',
                'load_dataset("/data/out", split="train")',
                'ray.data.read_parquet("/data/out/shards/")',
                "read_parquet('/data/out/shards/*.parquet')",
            ],
            ["read_webdataset", "wds.WebDataset"],
        ),
        (
            "files",
            [
                'load_dataset("imagefolder", data_dir="/data/out/shards"',
                'ray.data.read_images("/data/out/shards/"',
                "read_parquet('/data/out/manifests/*.parquet')",
            ],
            ["read_webdataset", "wds.WebDataset", 'load_dataset("/data/out"'],
        ),
    ],
)
def test_loading_snippets_name_the_paths_of_the_format(output_format, expected, absent):
    card = build_card(RECORD, make_spec(format=output_format), SCHEMA)
    for snippet in expected:
        assert snippet in card
    for snippet in absent:
        assert snippet not in card
    assert 'ray.data.read_parquet("/data/out/manifests/")' in card


def test_a_remote_output_streams_its_tars_through_a_command():
    card = build_card(RECORD, make_spec(uri="s3://bucket/out"), SCHEMA)
    assert 'fsspec.core.url_to_fs("s3://bucket/out/shards")' in card
    assert "pipe:aws s3 cp" in card


@pytest.mark.parametrize(
    ("images", "bucket"),
    [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (250_000, "100K<n<1M"), (10**10, "n>1B")],
)
def test_size_categories(images, bucket):
    assert size_category(images) == bucket


def test_write_card_uses_the_first_shards_manifest_schema(tmp_path):
    storage = Storage(str(tmp_path))
    shard = "000000000000-abcdef01"
    buffer = io.BytesIO()
    pq.write_table(pa.table({"key": ["k"], "category": ["x"]}), buffer)
    storage.write_bytes(manifest_path(shard), buffer.getvalue())

    write_card(storage, {**RECORD, "shards": [{"shard": shard}]}, make_spec())

    meta = front_matter((tmp_path / CARD_FILE).read_text())
    assert meta["koala_batch"]["columns"] == {"key": "string", "category": "string"}


def test_the_card_is_koala_batchs_own_file():
    assert classify(CARD_FILE) == (FileKind.CARD, None)
    listing = scan_output(["_job.json", CARD_FILE, "notes/README.md"])
    assert CARD_FILE in listing.own_files  # an overwrite deletes it
    assert listing.foreign == ("notes/README.md",)
    assert classify(f"{CARD_FILE}.0123abcd.partial") == (FileKind.PARTIAL, None)


def test_the_last_runs_gpu_hours_and_cost_are_on_the_card():
    from koala_batch.output.stats import run_cost

    per_actor = [{"life_s": 1800.0}, {"life_s": 1800.0}]
    record = {**RECORD, "cost": run_cost(per_actor, 1.0, images=8, gpu_hour_cost=2.5)}
    card = build_card(record, make_spec(), SCHEMA)

    assert front_matter(card)["koala_batch"]["cost"] == {
        "gpu_hours": 1.0,
        "gpu_hour_cost": 2.5,
        "cost": 2.5,
        "cost_per_1000_images": 312.5,
    }
    assert (
        "- compute: GPU-hours 1 (2 actor(s) x 1 GPU, last run); cost 2.5 at 2.5 per GPU-hour; "
        "cost/1000 images 312.5\n" in card
    )


@pytest.mark.parametrize("cost", [None, {}, "n/a"])
def test_a_record_without_a_cost_section_gives_a_card_without_one(cost):
    record = dict(RECORD) if cost is None else {**RECORD, "cost": cost}
    card = build_card(record, make_spec(), SCHEMA)
    assert "cost" not in front_matter(card)["koala_batch"]
    assert "- compute:" not in card
