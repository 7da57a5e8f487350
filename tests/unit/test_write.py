"""The write stage on a local directory: tar + manifest per shard, idempotent and deterministic."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from koala_batch.keys import sample_key, shard_name
from koala_batch.output import layout
from koala_batch.schemas import MANIFEST_COLUMNS, MANIFEST_FIELDS, SUMMARY_SCHEMA, name_rows
from koala_batch.stages.write import WriteShard
from tests.unit.conftest import encoded_table, make_spec

IDS = [f"row-{i}" for i in range(6)]
ERRORS = {2, 4}
PASSTHROUGH = {"category": ["a", "b", "c", "d", "e", "f"], "score": [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]}


def spec_for(out: Path, **output):
    return make_spec(
        out,
        input={"passthrough_columns": ["category", "score"]},
        output={"rows_per_shard": 8, **output},
    )


def rows_for(spec, first_ordinal: int = 0) -> pa.Table:
    return encoded_table(
        spec, IDS, errors=ERRORS, first_ordinal=first_ordinal, passthrough=PASSTHROUGH
    )


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {info.name: archive.extractfile(info).read() for info in archive.getmembers()}


def tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as archive:
        return archive.getnames()


@pytest.fixture
def written(out_dir):
    """One shard written from IDS; (spec, input rows, summary table, shard name)."""
    spec = spec_for(out_dir)
    table = rows_for(spec)
    summary = WriteShard(spec)(table)
    return spec, table, summary, summary.column("shard")[0].as_py()


def test_shard_lands_at_the_documented_paths(out_dir, written):
    spec, table, summary, shard = written

    assert shard == shard_name(0, name_rows(table))
    assert (out_dir / "shards" / f"{shard}.tar").is_file()
    assert (out_dir / "manifests" / f"{shard}.parquet").is_file()
    assert sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()) == [
        f"manifests/{shard}.parquet",
        f"shards/{shard}.tar",
    ]  # nothing half-written left


def test_summary_row(out_dir, written):
    _, _, summary, shard = written
    assert summary.schema == SUMMARY_SCHEMA
    row = summary.to_pylist()[0]
    assert row["rows"] == 6
    assert row["ok"] == 4
    assert row["errors"] == 2
    assert row["first_ordinal"] == 0
    assert row["tar"].endswith(f"shards/{shard}.tar")
    assert row["manifest"].endswith(f"manifests/{shard}.parquet")
    assert str(out_dir) in row["tar"]


def test_manifest_schema_is_exactly_the_declared_one(out_dir, written):
    _, _, _, shard = written
    manifest = pq.read_table(out_dir / "manifests" / f"{shard}.parquet")

    assert manifest.column_names == [*MANIFEST_COLUMNS, "category", "score"]
    for field in MANIFEST_FIELDS:
        assert manifest.schema.field(field.name).type == field.type, field.name
        assert manifest.schema.field(field.name).nullable == field.nullable, field.name
    assert manifest.schema.field("category").type == pa.string()
    assert manifest.schema.field("score").type == pa.float64()


def test_manifest_rows(out_dir, written):
    spec, table, _, shard = written
    manifest = pq.read_table(out_dir / "manifests" / f"{shard}.parquet").to_pylist()

    assert [row["key"] for row in manifest] == [sample_key(i, 0) for i in IDS]
    assert [row["id"] for row in manifest] == IDS
    assert [row["status"] for row in manifest] == ["ok", "ok", "error", "ok", "error", "ok"]
    assert [row["category"] for row in manifest] == PASSTHROUGH["category"]
    assert [row["seed"] for row in manifest] == table.column("seed").to_pylist()
    for row in manifest:
        assert row["shard"] == shard
        assert row["steps"] == spec.resolved_steps == 2
        assert row["guidance_scale"] == 5.0
        assert (row["width"], row["height"]) == (64, 64)
        assert row["model"] == "tiny"
        assert row["image_format"] == "png"


def test_error_rows_are_in_the_manifest_without_a_member(out_dir, written):
    _, _, _, shard = written
    manifest = pq.read_table(out_dir / "manifests" / f"{shard}.parquet").to_pylist()

    for position in ERRORS:
        row = manifest[position]
        assert row["status"] == "error"
        assert row["member"] is None
        assert row["sha256"] is None
        assert row["bytes"] == 0
        assert row["error"] == "prompt is empty or whitespace only"
    for position in set(range(6)) - ERRORS:
        assert manifest[position]["member"] == f"{sample_key(IDS[position], 0)}.png"
        assert manifest[position]["error"] is None


def test_tar_holds_an_image_and_a_json_per_ok_row_only(out_dir, written):
    _, _, _, shard = written
    names = tar_names(out_dir / "shards" / f"{shard}.tar")

    expected = []
    for position, row_id in enumerate(IDS):
        if position not in ERRORS:
            key = sample_key(row_id, 0)
            expected += [f"{key}.png", f"{key}.json"]
    assert names == expected


def test_manifest_sha256_and_bytes_match_the_tar_members(out_dir, written):
    _, table, _, shard = written
    members = read_tar(out_dir / "shards" / f"{shard}.tar")
    manifest = pq.read_table(out_dir / "manifests" / f"{shard}.parquet").to_pylist()
    images = dict(
        zip(table.column("key").to_pylist(), table.column("image").to_pylist(), strict=True)
    )

    checked = 0
    for row in manifest:
        if row["member"] is None:
            continue
        data = members[row["member"]]
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert len(data) == row["bytes"]
        assert data == images[row["key"]]
        checked += 1
    assert checked == 4


def test_json_member_describes_the_image(out_dir, written):
    spec, table, _, shard = written
    members = read_tar(out_dir / "shards" / f"{shard}.tar")
    key = sample_key("row-1", 0)
    record = json.loads(members[f"{key}.json"])

    assert record["key"] == key
    assert record["id"] == "row-1"
    assert record["image_index"] == 0
    assert record["prompt"] == "a photo of thing row-1"
    assert record["seed"] == table.column("seed").to_pylist()[1]
    assert record["steps"] == 2
    assert record["width"] == 64 and record["height"] == 64
    assert record["model"] == "tiny"
    assert record["category"] == "b"
    assert record["score"] == 1.5


def test_writing_the_same_rows_again_does_not_rewrite(out_dir, written):
    spec, table, summary, shard = written
    manifest = out_dir / "manifests" / f"{shard}.parquet"
    tar = out_dir / "shards" / f"{shard}.tar"
    before = {p: (p.stat().st_mtime_ns, p.stat().st_ino, p.read_bytes()) for p in (manifest, tar)}

    again = WriteShard(spec)(table)

    # The same stats; no commit time, since this call committed nothing.
    (first_stats,) = summary.to_pylist()
    assert again.to_pylist() == [{**first_stats, "committed_at": None, "generated_at": None}]
    for path, (mtime, inode, data) in before.items():
        assert path.stat().st_mtime_ns == mtime
        assert path.stat().st_ino == inode
        assert path.read_bytes() == data


def test_same_rows_give_identical_tar_bytes(tmp_path):
    shards = []
    for name in ("one", "two"):
        spec = spec_for(tmp_path / name)
        shards.append(WriteShard(spec)(rows_for(spec)).column("shard")[0].as_py())
    assert shards[0] == shards[1]
    first = (tmp_path / "one" / "shards" / f"{shards[0]}.tar").read_bytes()
    second = (tmp_path / "two" / "shards" / f"{shards[1]}.tar").read_bytes()
    assert first == second


def test_row_order_does_not_change_the_shard(tmp_path):
    spec = spec_for(tmp_path / "ordered")
    table = rows_for(spec)
    ordered = WriteShard(spec)(table).column("shard")[0].as_py()
    shuffled_spec = spec_for(tmp_path / "shuffled")
    shuffled = WriteShard(shuffled_spec)(table.take([5, 3, 0, 4, 1, 2])).column("shard")[0].as_py()

    assert shuffled == ordered
    assert (tmp_path / "shuffled" / "shards" / f"{shuffled}.tar").read_bytes() == (
        tmp_path / "ordered" / "shards" / f"{ordered}.tar"
    ).read_bytes()
    manifest = pq.read_table(tmp_path / "shuffled" / "manifests" / f"{shuffled}.parquet")
    assert manifest.column("ordinal").to_pylist() == list(range(6))


def test_tar_members_have_fixed_metadata(out_dir, written):
    _, _, _, shard = written
    with tarfile.open(out_dir / "shards" / f"{shard}.tar") as archive:
        for info in archive.getmembers():
            assert info.isfile()
            assert info.mtime == 0
            assert info.mode == 0o644
            assert (info.uid, info.gid) == (0, 0)


def test_disjoint_blocks_get_distinct_shards(out_dir):
    spec = spec_for(out_dir)
    first = WriteShard(spec)(rows_for(spec)).column("shard")[0].as_py()
    others = encoded_table(
        spec,
        [f"other-{i}" for i in range(3)],
        first_ordinal=6,
        passthrough={"category": ["g", "h", "i"], "score": [6.5, 7.5, 8.5]},
    )
    second = WriteShard(spec)(others).column("shard")[0].as_py()

    assert first != second
    assert second.startswith("000000000006-")
    assert sorted(p.name for p in (out_dir / "manifests").iterdir()) == sorted(
        [f"{first}.parquet", f"{second}.parquet"]
    )


@pytest.mark.parametrize(("image_format", "extension"), [("jpeg", "jpg"), ("webp", "webp")])
def test_member_extension_follows_the_image_format(out_dir, image_format, extension):
    spec = make_spec(out_dir, output={"image_format": image_format})
    shard = WriteShard(spec)(encoded_table(spec, ["x", "y"])).column("shard")[0].as_py()

    names = tar_names(out_dir / "shards" / f"{shard}.tar")
    assert names == [
        f"{sample_key('x', 0)}.{extension}",
        f"{sample_key('x', 0)}.json",
        f"{sample_key('y', 0)}.{extension}",
        f"{sample_key('y', 0)}.json",
    ]
    manifest = pq.read_table(out_dir / "manifests" / f"{shard}.parquet")
    assert manifest.column("image_format").to_pylist() == [image_format] * 2


def test_all_error_block_commits_an_empty_tar_and_a_manifest(out_dir):
    spec = make_spec(out_dir)
    shard = (
        WriteShard(spec)(encoded_table(spec, ["x", "y"], errors={0, 1})).column("shard")[0].as_py()
    )

    assert tar_names(out_dir / "shards" / f"{shard}.tar") == []
    manifest = pq.read_table(out_dir / "manifests" / f"{shard}.parquet")
    assert manifest.column("status").to_pylist() == ["error", "error"]


def test_paths_helpers():
    assert layout.tar_path("000000000000-abcdef01") == "shards/000000000000-abcdef01.tar"
    assert (
        layout.manifest_path("000000000000-abcdef01") == "manifests/000000000000-abcdef01.parquet"
    )


def test_manifest_is_readable_from_bytes(out_dir, written):
    # What readers of object stores do: read the whole object and parse it.
    _, _, _, shard = written
    data = (out_dir / "manifests" / f"{shard}.parquet").read_bytes()
    assert pq.read_table(io.BytesIO(data)).num_rows == 6
