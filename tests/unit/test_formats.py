"""output.format: the paths, classification, damage checks, writes and verify of each format.

The same rows are written by the real write stage in each format (no Ray, no model); the
consumers (`datasets`, duckdb, Ray Data, webdataset) read real job outputs in
tests/integration/test_formats.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import get_args

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from koala_batch.cli.inspect import read_images
from koala_batch.errors import RunSupersededError, SpecError
from koala_batch.keys import sample_key
from koala_batch.output.commit import claim_output, load_committed, remove_leftovers, uncommit
from koala_batch.output.formats import FORMATS as REGISTRY
from koala_batch.output.formats import parquet, shard_damage
from koala_batch.output.formats.base import OutputFormat
from koala_batch.output.formats.parquet import row_group_bounds
from koala_batch.output.layout import (
    FOLDER_METADATA,
    HUGGINGFACE_METADATA,
    IMAGE_TYPE,
    OUTPUT_FORMATS,
    FileKind,
    ShardRecord,
    classify,
    folder_file_path,
    list_output,
    manifest_path,
    parquet_path,
    scan_output,
    shard_record,
    tar_path,
)
from koala_batch.output.verify import verify_output
from koala_batch.schemas import MANIFEST_COLUMNS
from koala_batch.spec import OutputSpec, spec_from_dict
from koala_batch.stages.write import WriteShard
from koala_batch.storage import Storage
from tests.conftest import tiny_spec
from tests.unit.conftest import encoded_table, make_spec, png_bytes

FORMATS = ("webdataset", "parquet", "files")
IDS = [f"row-{i}" for i in range(6)]
ERRORS = {2, 4}
OK_KEYS = [sample_key(row_id, 0) for position, row_id in enumerate(IDS) if position not in ERRORS]
PASSTHROUGH = {"category": list("abcdef"), "tags": [["x"], [], ["y", "z"], None, ["w"], ["v"]]}
SHARD = "000000000000-abcdef01"
KEY = "0123456789abcdef0123456789abcdef-0"


def spec_for(out: Path, output_format: str, **output):
    return make_spec(
        out,
        input={"passthrough_columns": ["category", "tags"]},
        output={"rows_per_shard": 8, "format": output_format, **output},
    )


def write_rows(spec, ids=IDS, errors=ERRORS, first_ordinal=0) -> tuple[pa.Table, str]:
    passthrough = {name: values[: len(ids)] for name, values in PASSTHROUGH.items()}
    table = encoded_table(
        spec, ids, errors=errors, first_ordinal=first_ordinal, passthrough=passthrough
    )
    return table, WriteShard(spec)(table).column("shard")[0].as_py()


def all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def images_by_member(table: pa.Table) -> dict[str, bytes]:
    return {
        f"{key}.png": image
        for key, image in zip(
            table.column("key").to_pylist(), table.column("image").to_pylist(), strict=True
        )
        if image is not None
    }


@pytest.fixture(params=FORMATS)
def output_format(request) -> str:
    return request.param


def build(out_dir: Path, output_format: str) -> tuple[pa.Table, str]:
    """A claimed output with one shard of IDS written in the format: (rows, shard)."""
    spec = spec_for(out_dir, output_format)
    claim_output(Storage(str(out_dir)), spec)
    return write_rows(spec)


@pytest.fixture
def built(out_dir, output_format) -> tuple[pa.Table, str]:
    return build(out_dir, output_format)


# ---------------------------------------------------------------------------------------
# spec


def test_format_defaults_to_webdataset_and_enters_the_fingerprint(out_dir):
    default = make_spec(out_dir)
    assert default.output.format == "webdataset"
    assert default.fingerprint_fields()["format"] == "webdataset"
    explicit = make_spec(out_dir, output={"format": "webdataset"})
    assert explicit.fingerprint() == default.fingerprint()
    parquet = make_spec(out_dir, output={"format": "parquet"})
    files = make_spec(out_dir, output={"format": "files"})
    assert parquet.fingerprint_fields()["format"] == "parquet"
    assert len({default.fingerprint(), parquet.fingerprint(), files.fingerprint()}) == 3


def test_the_spec_offers_exactly_the_formats_the_layout_knows():
    assert get_args(OutputSpec.model_fields["format"].annotation) == OUTPUT_FORMATS


def test_an_unknown_format_is_refused(out_dir):
    with pytest.raises(SpecError, match="output.format"):
        spec_from_dict(tiny_spec("in.parquet", str(out_dir), output={"format": "zip"}))


# ---------------------------------------------------------------------------------------
# layout: what each file is


@pytest.mark.parametrize(
    ("relative", "kind"),
    [
        (f"shards/{SHARD}.tar", FileKind.TAR),
        (f"shards/{SHARD}.parquet", FileKind.PARQUET_SHARD),
        (f"shards/{SHARD}/{KEY}.png", FileKind.FOLDER_FILE),
        (f"shards/{SHARD}/{KEY}.jpg", FileKind.FOLDER_FILE),
        (f"shards/{SHARD}/{KEY}.webp", FileKind.FOLDER_FILE),
        (f"shards/{SHARD}/metadata.parquet", FileKind.FOLDER_FILE),
        (f"shards/{SHARD}.parquet.0a1b.partial", FileKind.PARTIAL),
        (f"shards/{SHARD}/{KEY}.png.0a1b.partial", FileKind.PARTIAL),
        (f"shards/{SHARD}/metadata.parquet.0a1b.partial", FileKind.PARTIAL),
        # Not names koala-batch writes: a user's files, never deleted.
        (f"shards/{SHARD}/{KEY}.json", FileKind.FOREIGN),
        (f"shards/{SHARD}/notes.txt", FileKind.FOREIGN),
        (f"shards/{SHARD}/sub/{KEY}.png", FileKind.FOREIGN),
        ("shards/backup.parquet", FileKind.FOREIGN),
        (f"shards/{SHARD}.parquet.backup", FileKind.FOREIGN),
        (f"shards/backup/{KEY}.png", FileKind.FOREIGN),
    ],
)
def test_classify_knows_every_formats_files(relative, kind):
    assert classify(relative)[0] is kind
    if kind in (FileKind.TAR, FileKind.PARQUET_SHARD, FileKind.FOLDER_FILE):
        assert classify(relative)[1] == SHARD


def test_data_without_a_manifest_is_a_leftover_in_every_format():
    committed = "000000000000-00000001"
    files = [
        f"manifests/{committed}.parquet",
        f"shards/{committed}/{KEY}.png",
        f"shards/{committed}/{FOLDER_METADATA}",
        f"shards/{SHARD}.parquet",
        f"shards/{SHARD}/{KEY}.png",
        f"shards/{SHARD}/{FOLDER_METADATA}",
        f"shards/{SHARD}/{KEY}.png.99.partial",
        f"shards/{SHARD}/notes.txt",
    ]
    listing = scan_output(files)

    assert listing.committed == (committed,)
    assert dict(listing.leftovers) == {
        f"shards/{SHARD}.parquet": "parquet shard without a manifest: not committed",
        f"shards/{SHARD}/{KEY}.png": "shard folder file without a manifest: not committed",
        f"shards/{SHARD}/{FOLDER_METADATA}": "shard folder file without a manifest: not committed",
        f"shards/{SHARD}/{KEY}.png.99.partial": "partial write",
    }
    assert listing.foreign == (f"shards/{SHARD}/notes.txt",)
    assert f"shards/{SHARD}/notes.txt" not in listing.own_files


def test_shard_damage_of_a_parquet_shard():
    listing = scan_output([parquet_path(SHARD)], {parquet_path(SHARD): 100})
    assert shard_damage(listing, SHARD, ShardRecord("parquet", 100)) is None
    assert shard_damage(listing, SHARD, ShardRecord("parquet", 99)) == (
        f"its Parquet file {parquet_path(SHARD)} has 100 bytes, its manifest records 99"
    )
    assert shard_damage(scan_output([]), SHARD, ShardRecord("parquet", 100)) == (
        f"its Parquet file {parquet_path(SHARD)} is missing"
    )
    # A manifest recording no format (none that koala-batch writes) is damaged.
    assert shard_damage(scan_output([tar_path(SHARD)]), SHARD, ShardRecord(None, None)) == (
        "its manifest records no known output format (None)"
    )
    assert shard_damage(scan_output([]), SHARD, ShardRecord("webdataset", 10)) == (
        "its tar is missing"
    )


def test_shard_damage_of_a_files_shard():
    image, metadata = (
        folder_file_path(SHARD, f"{KEY}.png"),
        folder_file_path(SHARD, FOLDER_METADATA),
    )
    record = ShardRecord("files", 50, {f"{KEY}.png": 10})
    whole = scan_output([image, metadata], {image: 10, metadata: 50})
    assert shard_damage(whole, SHARD, record) is None
    assert shard_damage(scan_output([metadata], {metadata: 50}), SHARD, record) == (
        f"its image {image} is missing"
    )
    assert shard_damage(
        scan_output([image, metadata], {image: 9, metadata: 50}), SHARD, record
    ) == (f"its image {image} has 9 bytes, its manifest records 10")
    assert shard_damage(scan_output([image], {image: 10}), SHARD, record) == (
        f"its metadata file {metadata} is missing"
    )


# ---------------------------------------------------------------------------------------
# write


def test_each_format_lands_at_its_documented_paths(out_dir, built, output_format):
    _, shard = built
    data = {
        "webdataset": [f"shards/{shard}.tar"],
        "parquet": [f"shards/{shard}.parquet"],
        "files": [f"shards/{shard}/{key}.png" for key in OK_KEYS]
        + [f"shards/{shard}/metadata.parquet"],
    }[output_format]
    assert all_files(out_dir) == sorted(["_job.json", f"manifests/{shard}.parquet", *data])
    manifest = pq.read_table(out_dir / manifest_path(shard))
    record = shard_record(manifest)
    assert record.output_format == output_format
    data_file = out_dir / data[-1]
    assert record.data_bytes == data_file.stat().st_size  # tar, parquet or folder metadata
    # The manifest is the same in every format: every row, error rows included.
    assert manifest.column_names == [*MANIFEST_COLUMNS, "category", "tags"]
    assert manifest.num_rows == len(IDS)


def test_parquet_shard_holds_the_ok_rows_with_their_images(out_dir):
    table, shard = build(out_dir, "parquet")
    data = pq.read_table(out_dir / parquet_path(shard))
    manifest = pq.read_table(out_dir / manifest_path(shard))

    assert data.column_names == ["image", *MANIFEST_COLUMNS, "category", "tags"]
    assert data.schema.field("image").type == IMAGE_TYPE
    assert data.column("key").to_pylist() == OK_KEYS  # no error row
    assert set(data.column("status").to_pylist()) == {"ok"}
    ok = manifest.filter(pa.compute.equal(manifest.column("status"), "ok"))
    assert data.drop_columns(["image"]).to_pylist() == ok.to_pylist()
    images = images_by_member(table)
    for row in data.select(["image", "member", "sha256"]).to_pylist():
        assert row["image"]["path"] == row["member"]
        assert row["image"]["bytes"] == images[row["member"]]
        assert hashlib.sha256(row["image"]["bytes"]).hexdigest() == row["sha256"]


def test_parquet_shard_carries_the_hugging_face_features(out_dir):
    from datasets import Features, Image, Value

    _, shard = build(out_dir, "parquet")
    schema = pq.read_schema(out_dir / parquet_path(shard))
    metadata = json.loads(schema.metadata[HUGGINGFACE_METADATA])
    assert metadata["info"]["features"]["image"] == {"_type": "Image"}

    features = Features.from_arrow_schema(schema)  # what load_dataset("parquet") uses
    assert features["image"] == Image()
    assert features["prompt"] == Value("string")
    assert features["seed"] == Value("int64")
    assert features["generated_at"] == Value("timestamp[us, tz=UTC]")
    # A nested passthrough column is left for `datasets` to infer from the Arrow type.
    assert "tags" not in metadata["info"]["features"]
    assert features["tags"].feature == Value("string")


def test_parquet_shard_compression_and_row_groups(out_dir, monkeypatch):
    spec = spec_for(out_dir, "parquet")
    table = encoded_table(spec, IDS, errors=ERRORS, passthrough=PASSTHROUGH)
    sizes = [len(image) for image in table.column("image").to_pylist() if image is not None]
    # Row groups hold about ROW_GROUP_BYTES of images: here two images each.
    monkeypatch.setattr(parquet, "ROW_GROUP_BYTES", sizes[0] + sizes[1])
    shard = WriteShard(spec)(table).column("shard")[0].as_py()

    metadata = pq.ParquetFile(out_dir / parquet_path(shard)).metadata
    assert [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)] == [2, 2]
    columns = metadata.row_group(0)
    compression = {
        columns.column(i).path_in_schema: columns.column(i).compression
        for i in range(columns.num_columns)
    }
    assert compression.pop("image.bytes") == "UNCOMPRESSED"  # PNG bytes are compressed already
    assert set(compression.values()) == {"ZSTD"}


def test_row_group_bounds():
    assert row_group_bounds([], 10) == []
    assert row_group_bounds([4, 4, 4, 4, 4], 10) == [(0, 2), (2, 4), (4, 5)]
    assert row_group_bounds([30, 1, 1], 10) == [(0, 1), (1, 3)]  # a large image alone
    assert row_group_bounds([10, 10], 10) == [(0, 1), (1, 2)]


def test_files_shard_holds_one_file_per_ok_image_and_its_metadata(out_dir):
    table, shard = build(out_dir, "files")
    for member, image in images_by_member(table).items():
        assert (out_dir / folder_file_path(shard, member)).read_bytes() == image
    metadata = pq.read_table(out_dir / folder_file_path(shard, FOLDER_METADATA))
    manifest = pq.read_table(out_dir / manifest_path(shard))
    assert metadata.column_names == ["file_name", *MANIFEST_COLUMNS, "category", "tags"]
    assert metadata.column("file_name").to_pylist() == [f"{key}.png" for key in OK_KEYS]
    ok = manifest.filter(pa.compute.equal(manifest.column("status"), "ok"))
    assert metadata.drop_columns(["file_name"]).to_pylist() == ok.to_pylist()


def test_same_rows_give_identical_data_in_every_format(tmp_path, output_format):
    data = []
    for name in ("one", "two"):
        spec = spec_for(tmp_path / name, output_format)
        _, shard = write_rows(spec)
        root = tmp_path / name / "shards"
        data.append({path: (root / path).read_bytes() for path in all_files(root)})
    assert data[0] == data[1]
    assert data[0]


def test_an_all_error_shard_has_an_empty_tar_or_no_data_file(out_dir, output_format):
    # Once an empty shards/{shard}.parquet (or a folder of just an empty metadata.parquet),
    # on which `datasets.load_dataset("parquet")` and "imagefolder" fail ("BatchSize must
    # be greater than 0"): the README recipes broke whenever a shard held only error rows.
    spec = spec_for(out_dir, output_format)
    _, shard = write_rows(spec, ids=IDS[:2], errors={0, 1})

    report = verify_output(str(out_dir))
    assert report.ok, report.format()
    manifest = pq.read_table(out_dir / manifest_path(shard))
    record = shard_record(manifest)
    assert shard_damage(list_output(Storage(str(out_dir))), shard, record) is None
    if output_format == "webdataset":
        assert record.has_data_file and all_files(out_dir / "shards") == [f"{shard}.tar"]
    else:
        assert (record.data_bytes, record.has_data_file) == (0, False)
        assert not (out_dir / "shards").exists()


def test_a_superseded_run_writes_no_data(out_dir, output_format):
    spec = spec_for(out_dir, output_format)
    storage = Storage(str(out_dir))
    claim_output(storage, spec, run_id="the-new-run")
    table = encoded_table(spec, IDS, errors=ERRORS, passthrough=PASSTHROUGH)

    with pytest.raises(RunSupersededError):
        WriteShard(spec, run_id="an-old-run")(table)
    assert all_files(out_dir) == ["_job.json"]


# ---------------------------------------------------------------------------------------
# commit: resume and overwrite see each format's files


def damage(out_dir: Path, shard: str, output_format: str) -> str:
    """Truncate the shard's data (its tar, Parquet file, or one image): the file's path."""
    members = pq.read_table(out_dir / manifest_path(shard), columns=["member"])
    first_image = next(member for member in members.column("member").to_pylist() if member)
    relative = {
        "webdataset": tar_path(shard),
        "parquet": parquet_path(shard),
        "files": folder_file_path(shard, first_image),
    }[output_format]
    path = out_dir / relative
    path.write_bytes(path.read_bytes()[:100])
    return relative


def test_resume_checks_and_uncommits_damaged_shards_in_every_format(out_dir, output_format):
    spec = spec_for(out_dir, output_format)
    storage = Storage(str(out_dir))
    _, good = write_rows(spec)
    _, bad = write_rows(spec, ids=["x", "y"], errors=set(), first_ordinal=10)
    before = all_files(out_dir)
    assert load_committed(storage).damaged == {}

    relative = damage(out_dir, bad, output_format)
    state = load_committed(storage)

    assert set(state.shards) == {good}
    what = "its tar has 100 bytes" if output_format == "webdataset" else f"{relative} has 100"
    assert list(state.damaged) == [bad] and what in state.damaged[bad]
    uncommit(storage, [bad])
    assert all_files(out_dir) == [path for path in before if bad not in path]
    assert load_committed(storage).damaged == {}


def test_leftovers_of_each_format_are_removed_and_committed_data_kept(out_dir, output_format):
    spec = spec_for(out_dir, output_format)
    storage = Storage(str(out_dir))
    _, kept = write_rows(spec)
    _, cut = write_rows(spec, ids=["x", "y"], errors=set(), first_ordinal=10)
    committed_files = [path for path in all_files(out_dir) if cut not in path]
    (out_dir / manifest_path(cut)).unlink()  # a write cut short before its commit point
    (out_dir / "shards" / f"{cut}.parquet.0123.partial").write_bytes(b"half")
    os.makedirs(out_dir / "shards" / cut, exist_ok=True)
    (out_dir / "shards" / cut / "notes.txt").write_bytes(b"a user's file")

    removed = remove_leftovers(storage)

    assert removed and all(cut in path for path in removed)
    assert all_files(out_dir) == sorted([*committed_files, f"shards/{cut}/notes.txt"])
    assert set(list_output(storage).committed) == {kept}


# ---------------------------------------------------------------------------------------
# verify


def test_verify_passes_a_whole_output_in_every_format(out_dir, built):
    report = verify_output(str(out_dir))
    assert report.ok, report.format()
    assert report.images_checked == len(OK_KEYS)
    assert report.rows_failed == len(ERRORS)


def test_verify_names_the_damaged_data_file(out_dir, built, output_format):
    _, shard = built
    relative = damage(out_dir, shard, output_format)

    report = verify_output(str(out_dir))

    assert not report.ok
    assert any(relative in problem for problem in report.problems), report.problems


@pytest.mark.parametrize("output_format", ["parquet", "files"])  # tars: test_verify.py
def test_verify_names_missing_and_extra_images(out_dir, output_format):
    _, shard = build(out_dir, output_format)
    missing, extra = OK_KEYS[0], sample_key(IDS[2], 0)  # IDS[2] is an error row
    if output_format == "files":
        (out_dir / folder_file_path(shard, f"{missing}.png")).unlink()
        (out_dir / folder_file_path(shard, f"{extra}.png")).write_bytes(b"not an image")
    else:
        path = out_dir / parquet_path(shard)
        data = pq.read_table(path)
        keys = data.column("key").to_pylist()
        data = data.filter(pa.array([key != missing for key in keys]))
        pq.write_table(data, path)

    problems = verify_output(str(out_dir)).problems

    assert any(f"{missing}.png" in p and "missing" in p for p in problems), problems
    if output_format == "files":
        assert any(f"{extra}.png belongs to error row" in p for p in problems), problems


def test_verify_wants_the_image_feature_in_a_parquet_shard(out_dir):
    _, shard = build(out_dir, "parquet")
    path = out_dir / parquet_path(shard)
    data = pq.read_table(path)
    pq.write_table(data.replace_schema_metadata(None), path)

    problems = verify_output(str(out_dir)).problems

    assert any("Hugging Face Image" in p and parquet_path(shard) in p for p in problems), problems


def test_verify_checks_a_folders_metadata(out_dir):
    _, shard = build(out_dir, "files")
    path = out_dir / folder_file_path(shard, FOLDER_METADATA)
    metadata = pq.read_table(path)
    pq.write_table(metadata.slice(1), path)  # forgets its first image
    problems = verify_output(str(out_dir)).problems
    assert any(f"does not list {OK_KEYS[0]}.png" in p for p in problems), problems

    path.unlink()
    problems = verify_output(str(out_dir)).problems
    assert any(
        f"metadata file {folder_file_path(shard, FOLDER_METADATA)} is missing" in p
        for p in problems
    ), problems


def test_a_manifest_without_a_recorded_format_is_a_problem_and_damaged(out_dir, built):
    _, shard = built
    path = out_dir / manifest_path(shard)
    manifest = pq.read_table(path)
    metadata = {
        name: value
        for name, value in (manifest.schema.metadata or {}).items()
        if name != b"koala_batch.format"
    }
    pq.write_table(manifest.replace_schema_metadata(metadata), path)

    report = verify_output(str(out_dir))
    assert report.problems == [
        f"shard {shard}: its manifest records no known output format (None); it was not "
        "written by this koala-batch version"
    ]
    assert load_committed(Storage(str(out_dir))).damaged == {
        shard: "its manifest records no known output format (None)"
    }


def with_sizes(table: pa.Table, sizes: list[tuple[int, int]]) -> pa.Table:
    """The table with each row's image re-made at its own (width, height)."""
    images = [png_bytes(index, width, height) for index, (width, height) in enumerate(sizes)]
    for name, values, kind in (
        ("width", [width for width, _ in sizes], pa.int32()),
        ("height", [height for _, height in sizes], pa.int32()),
        ("image", images, pa.binary()),
        ("sha256", [hashlib.sha256(image).hexdigest() for image in images], pa.string()),
        ("bytes", [len(image) for image in images], pa.int64()),
    ):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, kind))
    return table


@pytest.mark.parametrize("output_format", FORMATS)
def test_a_shard_of_mixed_sizes_comes_out_right_in_every_format(out_dir, output_format):
    spec = spec_for(out_dir, output_format)
    storage = Storage(str(out_dir))
    claim_output(storage, spec)
    sizes = [(64, 64), (128, 64), (64, 96), (128, 64)]
    ids = IDS[:4]
    passthrough = {name: values[:4] for name, values in PASSTHROUGH.items()}
    table = with_sizes(encoded_table(spec, ids, passthrough=passthrough), sizes)
    shard = WriteShard(spec)(table).column("shard")[0].as_py()

    assert verify_output(str(out_dir), spec=None).ok
    rows = pq.read_table(out_dir / manifest_path(shard)).to_pylist()
    assert [(row["width"], row["height"]) for row in rows] == sizes
    stored = read_images(storage, shard, output_format, rows)
    for row in rows:
        assert Image.open(io.BytesIO(stored[row["key"]])).size == (row["width"], row["height"])

    # verify decodes each image at its row's size: a row recording another size fails.
    other = out_dir.parent / f"{out_dir.name}-wrong"
    wrong_spec = spec_for(other, output_format)
    claim_output(Storage(str(other)), wrong_spec)
    mislabelled = table.set_column(
        table.schema.get_field_index("width"), "width", pa.array([64, 64, 64, 128], pa.int32())
    )
    WriteShard(wrong_spec)(mislabelled)
    report = verify_output(str(other))
    assert not report.ok
    (problem,) = report.problems  # only the second row records a size it does not have
    assert sample_key(ids[1], 0) in problem and "the manifest says 64x64" in problem


def test_the_registry_holds_one_class_per_format_the_spec_offers():
    assert tuple(REGISTRY) == OUTPUT_FORMATS
    assert len({type(output_format) for output_format in REGISTRY.values()}) == len(REGISTRY)


@pytest.mark.parametrize("name", OUTPUT_FORMATS)
def test_every_registered_format_implements_the_whole_protocol(name):
    output_format = REGISTRY[name]
    assert isinstance(output_format, OutputFormat) and output_format.name == name
    assert output_format.data_kind and output_format.data_glob.startswith("shards/")
    required = {
        member
        for member, value in vars(OutputFormat).items()
        if getattr(value, "__isabstractmethod__", False)
    }
    assert required == {"data_path", "damage", "write", "scan", "read_images", "card_recipes"}
    for member in required:
        implemented = getattr(type(output_format), member)
        assert not getattr(implemented, "__isabstractmethod__", False), f"{name}: {member}"
    recipes = output_format.card_recipes("s3://bucket/out")
    assert "s3://bucket/out" in recipes.datasets and "s3://bucket/out" in recipes.ray
    assert output_format.data_path("000000000000-abcdef01").startswith("shards/")
