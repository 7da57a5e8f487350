"""`verify_output` on real outputs built by the job's own stages (no Ray, no model).

The builder runs read -> validate -> (solid-colour images encoded by the encode stage's
encoder instead of a pipeline) -> write, then records `_SUCCESS` as `job.run` does. Each
test corrupts one thing and checks that verify names it.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from koala_batch.cli import main as cli
from koala_batch.errors import EXIT_INVALID, InputError, OutputConflictError, SpecError
from koala_batch.inputs.files import plan_input
from koala_batch.keys import sample_key
from koala_batch.output.commit import check_output, claim_output, write_success
from koala_batch.output.layout import manifest_path, tar_path
from koala_batch.output.verify import VerifyReport, verify_output
from koala_batch.schemas import STATUS_OK, SUMMARY_SCHEMA
from koala_batch.spec import JobSpec, spec_from_dict
from koala_batch.stages.encode import encode_image
from koala_batch.stages.expand import ExpandImages
from koala_batch.stages.read import ReadRowGroups
from koala_batch.stages.write import WriteShard
from koala_batch.storage import Storage
from tests.conftest import tiny_spec, write_prompt_table

PROMPTS_A = [f"a photo of koala number {i}" for i in range(7)] + [""]  # last row: error row
PROMPTS_B = [f"a painting of eucalyptus {i}" for i in range(5)]
IMAGES_PER_PROMPT = 2
ROWS_PER_SHARD = 8
TOTAL_IMAGES = (len(PROMPTS_A) + len(PROMPTS_B)) * IMAGES_PER_PROMPT  # 26: 4 shards
ERROR_IMAGES = IMAGES_PER_PROMPT


@dataclass
class Built:
    spec: JobSpec
    output: Path
    shards: list[str]  # sorted by first ordinal
    record: dict


def solid_image(ordinal: int, width: int, height: int, image_format: str) -> bytes:
    colour = np.array([ordinal * 37 % 256, ordinal * 91 % 256, ordinal * 53 % 256], np.uint8)
    return encode_image(np.broadcast_to(colour, (height, width, 3)).copy(), image_format, 90)


def build_output(
    tmp_path: Path,
    *,
    id_column: bool = False,
    image_format: str = "png",
    prompts_a: list | pa.Array = PROMPTS_A,
) -> Built:
    """A committed output made by the job's stages, with `_job.json` and `_SUCCESS`."""
    input_dir = tmp_path / "input"
    extra_a = {"uid": [f"a-{i}" for i in range(len(PROMPTS_A))]} if id_column else {}
    extra_b = {"uid": [f"b-{i}" for i in range(len(PROMPTS_B))]} if id_column else {}
    write_prompt_table(input_dir / "a.parquet", prompts_a, **extra_a)
    write_prompt_table(input_dir / "b.parquet", PROMPTS_B, **extra_b)
    output = tmp_path / "output"
    raw = tiny_spec(
        str(input_dir),
        str(output),
        generation={"images_per_prompt": IMAGES_PER_PROMPT},
        output={"rows_per_shard": ROWS_PER_SHARD, "image_format": image_format},
    )
    if id_column:
        raw["input"]["id_column"] = "uid"
    spec = spec_from_dict(raw)
    storage = Storage(spec.output.uri)
    assert claim_output(storage, spec) is False

    plan = plan_input(spec.input)
    reader, expand = ReadRowGroups(spec.input), ExpandImages(spec)
    work = pa.concat_tables(
        expand(reader(pa.Table.from_pylist([unit]))) for unit in plan.read_units()
    ).sort_by("ordinal")
    width, height = spec.generation.width, spec.generation.height
    images, digests, sizes = [], [], []
    for status, ordinal in zip(
        work.column("status").to_pylist(), work.column("ordinal").to_pylist(), strict=True
    ):
        data = solid_image(ordinal, width, height, image_format) if status == STATUS_OK else None
        images.append(data)
        digests.append(hashlib.sha256(data).hexdigest() if data else None)
        sizes.append(len(data) if data else 0)
    work = (
        work.append_column("image", pa.array(images, pa.binary()))
        .append_column("sha256", pa.array(digests, pa.string()))
        .append_column("bytes", pa.array(sizes, pa.int64()))
        .append_column("prompt_truncated", pa.array([False] * work.num_rows))
        .append_column("generated_at", pa.array([0.0] * work.num_rows))
    )

    writer = WriteShard(spec)
    summaries = []
    for start in range(0, work.num_rows, ROWS_PER_SHARD):
        stats = writer(work.slice(start, ROWS_PER_SHARD))
        summaries.extend(stats.cast(SUMMARY_SCHEMA).to_pylist())
    summaries.sort(key=lambda shard: shard["first_ordinal"])
    total = sum(shard["rows"] for shard in summaries)
    failed = sum(shard["errors"] for shard in summaries)
    record = {
        "status": "succeeded",
        "resumed": False,
        "counts": {
            "input_files": len(plan.files),
            "input_rows": plan.num_rows,
            "images_planned": plan.num_rows * IMAGES_PER_PROMPT,
            "images_committed": total,
            "images_ok": total - failed,
            "images_failed": failed,
            "images_written_this_run": total,
            "shards": len(summaries),
        },
        "fingerprint": spec.fingerprint(),
        "spec": spec.snapshot(),
        "shards": summaries,
    }
    write_success(storage, record)
    return Built(spec=spec, output=output, shards=[s["shard"] for s in summaries], record=record)


# helpers that corrupt an output ---------------------------------------------------------


def read_manifest(built: Built, shard: str) -> pa.Table:
    return pq.read_table(built.output / manifest_path(shard))


def write_manifest(built: Built, shard: str, rows: list[dict], schema: pa.Schema) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), built.output / manifest_path(shard))


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as archive:
        return [(info.name, archive.extractfile(info).read()) for info in archive.getmembers()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def first_ok_row(built: Built, shard: str) -> dict:
    return next(row for row in read_manifest(built, shard).to_pylist() if row["status"] == "ok")


def problems_with(report: VerifyReport, *parts: str) -> list[str]:
    return [problem for problem in report.problems if all(part in problem for part in parts)]


@pytest.fixture
def built(tmp_path) -> Built:
    return build_output(tmp_path)


# clean outputs ----------------------------------------------------------------------------


def test_clean_output_verifies_without_spec(built):
    report = verify_output(str(built.output))
    assert report.ok, report.format()
    assert report.problems == [] and report.problems_total == 0
    assert report.shards_checked == len(built.shards) == 4
    assert report.rows_checked == TOTAL_IMAGES
    assert report.rows_failed == ERROR_IMAGES
    assert report.images_checked == TOTAL_IMAGES - ERROR_IMAGES
    assert report.leftovers == []
    assert report.success_present
    assert report.expected_images is None and report.missing_inputs == 0
    assert report.format().splitlines()[-1].startswith("OK: 4 shard(s), 26 row(s), 24 image(s)")


@pytest.mark.parametrize(
    ("id_column", "image_format"), [(False, "png"), (True, "png"), (False, "jpeg"), (True, "webp")]
)
def test_clean_output_verifies_with_spec(tmp_path, id_column, image_format):
    built = build_output(tmp_path, id_column=id_column, image_format=image_format)
    report = verify_output(str(built.output), spec=built.spec)
    assert report.ok, report.format()
    assert report.expected_images == TOTAL_IMAGES
    assert report.missing_inputs == 0
    assert report.images_checked == TOTAL_IMAGES - ERROR_IMAGES
    if id_column:  # keys come from the id column, not the file and row
        keys = set(read_manifest(built, built.shards[0]).column("key").to_pylist())
        assert sample_key("a-0", 0) in keys


def test_verify_through_an_injected_filesystem(built):
    import fsspec

    report = verify_output(
        str(built.output), filesystem=fsspec.filesystem("file"), spec=built.spec, workers=1
    )
    assert report.ok, report.format()
    assert report.rows_checked == TOTAL_IMAGES


# corruptions ------------------------------------------------------------------------------


def test_flipped_byte_in_a_member_is_a_sha_mismatch(built):
    shard = built.shards[1]
    row = first_ok_row(built, shard)
    path = built.output / tar_path(shard)
    with tarfile.open(path) as archive:
        offset = archive.getmember(row["member"]).offset_data
    data = bytearray(path.read_bytes())
    data[offset + 20] ^= 0xFF  # inside the PNG header chunk, not the tar header
    path.write_bytes(bytes(data))

    report = verify_output(str(built.output))
    assert not report.ok
    assert problems_with(report, f"shard {shard}", row["member"], "sha256", row["sha256"])
    assert report.format().splitlines()[-1] == f"FAILED: {report.problems_total} problem(s)"


def test_deleted_tar_is_a_problem(built):
    shard = built.shards[2]
    (built.output / tar_path(shard)).unlink()
    report = verify_output(str(built.output))
    assert not report.ok
    assert problems_with(report, f"shard {shard}", f"tar {tar_path(shard)} is missing")
    assert report.leftovers == []


def test_deleted_manifest_row_is_a_missing_input_with_spec(built):
    shard = built.shards[0]
    manifest = read_manifest(built, shard)
    rows = manifest.to_pylist()
    dropped = next(row for row in rows if row["status"] == "ok" and row["image_index"] == 1)
    write_manifest(
        built, shard, [row for row in rows if row["key"] != dropped["key"]], manifest.schema
    )

    report = verify_output(str(built.output), spec=built.spec)
    assert not report.ok
    assert report.missing_inputs == 1
    assert problems_with(
        report,
        f"input row {dropped['source']} row {dropped['row_index']}",
        "image 1 is missing",
        dropped["key"],
    )
    # Without a spec the tar still gives it away: its image is listed by no manifest.
    plain = verify_output(str(built.output))
    assert problems_with(plain, f"shard {shard}", dropped["member"], "not listed in the manifest")


def test_manifest_copied_under_another_name_repeats_keys(built):
    shard = built.shards[1]
    copy = "000000009999-0000beef"
    shutil.copy(built.output / manifest_path(shard), built.output / manifest_path(copy))
    shutil.copy(built.output / tar_path(shard), built.output / tar_path(copy))
    key = read_manifest(built, shard).column("key")[0].as_py()

    report = verify_output(str(built.output))
    assert not report.ok
    assert problems_with(report, f"key {key}", f"in shard {shard} and shard {copy}")
    assert problems_with(report, f"shard {copy}", f"8 row(s) (key {key}, ...) say shard {shard!r}")
    # The copy is also listed nowhere in _SUCCESS.
    assert problems_with(report, f"shard {copy} is committed but not listed in _SUCCESS")


def test_same_id_and_image_under_another_key_is_a_duplicate(built):
    shard = built.shards[1]
    manifest = read_manifest(built, shard)
    rows = manifest.to_pylist()
    copy = "000000009999-0000beef"
    renamed = [
        dict(row, key=f"{i:032x}-0", shard=copy, member=None, status="error", error="copied")
        for i, row in enumerate(rows)
    ]
    write_manifest(built, copy, renamed, manifest.schema)
    write_tar(built.output / tar_path(copy), [])
    report = verify_output(str(built.output), max_problems_listed=100)
    first = rows[0]
    assert problems_with(
        report,
        f"id {first['id']!r} image {first['image_index']} appears in "
        f"shard {shard} and shard {copy} under different keys",
    )
    assert problems_with(report, f"shard {copy}: key {0:032x}-0 does not derive from its id")


def test_image_of_the_wrong_size_is_caught_by_decoding(built):
    shard = built.shards[3]
    manifest = read_manifest(built, shard)
    rows = manifest.to_pylist()
    target = next(row for row in rows if row["status"] == "ok")
    small = solid_image(target["ordinal"], 32, 48, "png")
    path = built.output / tar_path(shard)
    write_tar(
        path,
        [(name, small if name == target["member"] else data) for name, data in tar_members(path)],
    )
    for row in rows:
        if row["key"] == target["key"]:
            row["sha256"], row["bytes"] = hashlib.sha256(small).hexdigest(), len(small)
    write_manifest(built, shard, rows, manifest.schema)

    report = verify_output(str(built.output))
    assert report.problems == [
        f"shard {shard}: member {target['member']} (key {target['key']}) is 32x48, the manifest "
        "says 64x64"
    ]


def test_extra_member_in_a_tar_is_a_problem(built):
    shard = built.shards[0]
    path = built.output / tar_path(shard)
    write_tar(path, tar_members(path) + [("stray.txt", b"not an image")])
    report = verify_output(str(built.output))
    assert not report.ok
    assert problems_with(report, f"shard {shard}", "member stray.txt", "not listed in the manifest")


def test_duplicate_member_in_a_tar_is_a_problem(built):
    shard = built.shards[0]
    row = first_ok_row(built, shard)
    path = built.output / tar_path(shard)
    members = tar_members(path)
    write_tar(path, members + [m for m in members if m[0] == row["member"]])
    report = verify_output(str(built.output))
    assert problems_with(report, f"shard {shard}", row["member"], "appears more than once")


def test_missing_member_and_bad_sidecar_are_problems(built):
    shard = built.shards[2]
    rows = [row for row in read_manifest(built, shard).to_pylist() if row["status"] == "ok"]
    gone, bad_json = rows[0], rows[1]
    path = built.output / tar_path(shard)
    members = []
    for name, data in tar_members(path):
        if name == gone["member"]:
            continue
        if name == f"{bad_json['key']}.json":
            data = json.dumps(
                {
                    "key": bad_json["key"],
                    "id": "someone else",
                    "image_index": bad_json["image_index"],
                }
            ).encode()
        members.append((name, data))
    write_tar(path, members)
    report = verify_output(str(built.output))
    assert problems_with(
        report, f"shard {shard}", f"key {gone['key']}", f"member {gone['member']} is missing"
    )
    assert problems_with(report, f"sidecar {bad_json['key']}.json", "has id='someone else'")


def test_error_row_without_message_and_image_that_does_not_decode(built):
    shard = next(
        name
        for name in built.shards
        if "error" in read_manifest(built, name).column("status").to_pylist()
    )
    manifest = read_manifest(built, shard)
    rows = manifest.to_pylist()
    error_row = next(row for row in rows if row["status"] == "error")
    error_row["error"] = ""
    broken = next(row for row in rows if row["status"] == "ok")
    # A PNG cut short after its header: Pillow opens it, but it does not decode.
    with tarfile.open(built.output / tar_path(shard)) as archive:
        garbage = archive.extractfile(broken["member"]).read()[:60]
    broken["sha256"], broken["bytes"] = hashlib.sha256(garbage).hexdigest(), len(garbage)
    write_manifest(built, shard, rows, manifest.schema)
    path = built.output / tar_path(shard)
    write_tar(
        path,
        [(name, garbage if name == broken["member"] else data) for name, data in tar_members(path)],
    )

    report = verify_output(str(built.output))
    assert problems_with(report, f"shard {shard}", f"error row {error_row['key']}", "no error")
    assert problems_with(report, f"shard {shard}", broken["member"], "does not decode")
    assert len(report.problems) == 2, report.format()


def test_truncated_tar_is_unreadable_not_a_crash(built):
    shard = built.shards[1]
    path = built.output / tar_path(shard)
    path.write_bytes(path.read_bytes()[:700])
    report = verify_output(str(built.output))
    assert not report.ok
    assert problems_with(report, f"shard {shard}", tar_path(shard))


def test_unexpected_keys_against_a_smaller_input(built, tmp_path):
    # Same job, but the spec reads only a.parquet: b.parquet's images are unexpected.
    raw = built.spec.snapshot()
    raw["input"]["uri"] = str(tmp_path / "input" / "a.parquet")
    spec = spec_from_dict(raw)
    assert spec.fingerprint() == built.spec.fingerprint()
    report = verify_output(str(built.output), spec=spec, max_problems_listed=100)
    unexpected = problems_with(report, "unexpected key")
    assert len(unexpected) == len(PROMPTS_B) * IMAGES_PER_PROMPT
    assert sample_key("b.parquet#0", 0) in "".join(unexpected)
    assert report.missing_inputs == 0
    assert report.expected_images == len(PROMPTS_A) * IMAGES_PER_PROMPT


def test_spec_of_another_job_is_a_problem(built):
    raw = built.spec.snapshot()
    raw["generation"]["seed"] = 8
    report = verify_output(str(built.output), spec=spec_from_dict(raw))
    assert problems_with(report, "_job.json", "another fingerprint")
    assert problems_with(report, "_SUCCESS", "another fingerprint")


# leftovers and _SUCCESS --------------------------------------------------------------------


def test_leftovers_are_reported_but_do_not_fail(built):
    orphan = "000000000100-feedf00d"
    shutil.copy(built.output / tar_path(built.shards[0]), built.output / tar_path(orphan))
    partial = "manifests/000000000099-0badf00d.parquet.0123abcd.partial"
    (built.output / partial).write_bytes(b"half")
    report = verify_output(str(built.output))
    assert report.ok, report.format()
    assert report.leftovers == [
        f"{partial} (partial write)",
        f"shards/{orphan}.tar (tar without a manifest: not committed)",
    ]
    assert report.shards_checked == len(built.shards)
    assert f"shards/{orphan}.tar" in report.format()


def test_a_users_file_in_an_output_is_a_problem_as_run_refuses_it(built):
    (built.output / "shards" / "notes.txt").write_text("mine")

    report = verify_output(str(built.output))

    assert not report.ok and report.leftovers == []
    assert problems_with(report, "shards/notes.txt", "koala-batch did not write")
    # The verdict `run` gives the same output.
    with pytest.raises(OutputConflictError, match="notes.txt"):
        check_output(Storage(str(built.output)), built.spec)


def test_a_folder_of_other_files_is_not_an_output(tmp_path):
    (tmp_path / "x.txt").write_text("not an output")

    report = verify_output(str(tmp_path))

    assert not report.ok, report.format()
    assert problems_with(report, "is not a koala-batch output", "no _job.json, no manifests/")
    assert problems_with(report, "x.txt", "koala-batch did not write")


def test_set_without_spec_is_refused_in_one_line(built, capsys):
    code = cli.main(["--log-format", "text", "verify", str(built.output), "--set", "a.b=1"])

    err = capsys.readouterr().err
    assert code == EXIT_INVALID
    assert err.strip().splitlines() == [
        "koala-batch: error: --set needs --spec: give the job spec the overrides apply to, "
        "or drop --set"
    ]


def test_success_listing_a_shard_that_does_not_exist(built):
    record = dict(built.record)
    ghost = dict(record["shards"][0], shard="000000099999-00000000")
    record["shards"] = record["shards"] + [ghost]
    (built.output / "_SUCCESS").write_text(json.dumps(record))
    report = verify_output(str(built.output))
    assert not report.ok
    assert problems_with(report, "_SUCCESS lists shard 000000099999-00000000", "not committed")


def test_success_count_mismatch(built):
    record = json.loads(json.dumps(built.record))
    record["counts"]["images_committed"] += 1
    (built.output / "_SUCCESS").write_text(json.dumps(record))
    report = verify_output(str(built.output))
    assert report.problems == [
        f"_SUCCESS counts images_committed={TOTAL_IMAGES + 1}, the manifests hold {TOTAL_IMAGES}"
    ]


def test_without_success_verify_passes_with_a_note(built):
    (built.output / "_SUCCESS").unlink()
    report = verify_output(str(built.output))
    assert report.ok, report.format()
    assert not report.success_present
    assert "no _SUCCESS" in report.format()


def test_missing_output_is_a_problem(tmp_path):
    report = verify_output(str(tmp_path / "nowhere"))
    assert not report.ok
    assert problems_with(report, "does not exist")


def test_problem_list_is_capped_but_counted(built):
    # Shard 0's tar is emptied (every image and sidecar missing: more problems than the
    # cap within one shard); the other tars are deleted (one problem each).
    first_rows = read_manifest(built, built.shards[0]).to_pylist()
    ok_rows = sum(row["status"] == "ok" for row in first_rows)
    write_tar(built.output / tar_path(built.shards[0]), [])
    for shard in built.shards[1:]:
        (built.output / tar_path(shard)).unlink()
    expected = 2 * ok_rows + len(built.shards) - 1
    report = verify_output(str(built.output), max_problems_listed=3)
    assert len(report.problems) == 3
    assert report.problems_total == expected
    text = report.format()
    assert f"... and {expected - 3} more" in text
    assert text.splitlines()[-1] == f"FAILED: {expected} problem(s)"


def test_byte_count_mismatch_is_a_problem(built):
    shard = built.shards[0]
    manifest = read_manifest(built, shard)
    rows = manifest.to_pylist()
    target = next(row for row in rows if row["status"] == "ok")
    target["bytes"] += 1
    write_manifest(built, shard, rows, manifest.schema)
    report = verify_output(str(built.output))
    assert report.problems == [
        f"shard {shard}: member {target['member']} (key {target['key']}) has "
        f"{target['bytes'] - 1} bytes, the manifest says {target['bytes']}"
    ]


# the input itself (issue 8, cases 1 and 5) ------------------------------------------------


def test_prompt_that_is_not_utf8_verifies_as_an_error_row(tmp_path):
    # Such a prompt once crashed `verify --spec` (UnicodeDecodeError from the validate
    # stage); it is an error row of the job, and verify plans it as one.
    prompts = pa.array([p.encode() for p in PROMPTS_A[:-1]] + [b"caf\xe9"], pa.binary())
    built = build_output(tmp_path, prompts_a=prompts.view(pa.string()))
    report = verify_output(str(built.output), spec=built.spec)
    assert report.ok, report.format()
    assert report.expected_images == TOTAL_IMAGES
    assert report.rows_failed == ERROR_IMAGES
    errors = {
        row["error"]
        for shard in built.shards
        for row in read_manifest(built, shard).to_pylist()
        if row["status"] == "error"
    }
    assert errors == {"prompt column 'prompt': byte 0xe9 at offset 3 is not valid UTF-8"}


def test_spec_whose_input_can_reach_the_output_is_refused(built, tmp_path):
    raw = built.spec.snapshot()
    raw["input"]["uri"] = str(tmp_path)  # holds input/ and output/: the manifests too
    with pytest.raises(SpecError, match=r"input\.uri .* can reach output\.uri .*output"):
        verify_output(str(built.output), spec=spec_from_dict(raw))


def test_damaged_input_row_group_is_one_input_error(built, tmp_path):
    path = tmp_path / "input" / "b.parquet"
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start : start + 16] = b"\xff" * 16  # the first page header
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"b\.parquet: row group 0 \(rows 0 to 4\) is unreadable"):
        verify_output(str(built.output), spec=built.spec)


def test_the_report_gives_the_recorded_cost(built):
    from koala_batch.output.stats import run_cost

    record = dict(built.record)
    record["cost"] = run_cost([{"life_s": 3600.0}], 0.5, images=24, gpu_hour_cost=2.0)
    (built.output / "_SUCCESS").write_text(json.dumps(record))

    report = verify_output(str(built.output))

    assert report.ok, report.format()
    assert report.cost == record["cost"]
    assert (
        "  compute: GPU-hours 0.5 (1 actor(s) x 0.5 GPU, last run); cost 1 at 2 per GPU-hour; "
        "cost/1000 images 41.67"
    ) in report.format().splitlines()


@pytest.mark.parametrize("cost", [None, "free", {"gpu_hours": None}])
def test_a_record_without_a_usable_cost_shows_none_or_says_not_measured(built, cost):
    record = dict(built.record)
    if cost is not None:
        record["cost"] = cost
    (built.output / "_SUCCESS").write_text(json.dumps(record))

    text = verify_output(str(built.output)).format()

    compute = [line for line in text.splitlines() if "compute:" in line]
    if isinstance(cost, dict):
        assert compute == ["  compute: GPU-hours n/a (not measured)"]
    else:
        assert compute == []
