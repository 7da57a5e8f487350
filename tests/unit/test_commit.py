"""The commit protocol on a local directory: claim, resume, refuse, overwrite, leftovers."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from koala_batch.keys import KeySet, sample_key
from koala_batch.output.commit import (
    JOB_FILE_FORMAT,
    OutputConflictError,
    claim_output,
    damage_beyond_input,
    load_committed,
    remove_leftovers,
    uncommit,
    write_success,
)
from koala_batch.output.layout import recorded_data_bytes
from koala_batch.schemas import RUN_FIELDS
from koala_batch.stages.write import WriteShard
from koala_batch.storage import Storage
from tests.unit.conftest import encoded_table, make_spec, race_for_claim


def all_files(root: Path) -> list[str]:
    if not root.exists():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture
def storage(out_dir) -> Storage:
    return Storage(str(out_dir))


def write_shard(spec, ids, first_ordinal=0, errors=frozenset()) -> str:
    table = encoded_table(spec, ids, first_ordinal=first_ordinal, errors=errors)
    return WriteShard(spec)(table).column("shard")[0].as_py()


# ---------------------------------------------------------------------------------------
# claim_output


def test_claim_of_an_empty_prefix_writes_the_job_file(storage, out_dir):
    spec = make_spec(out_dir)

    assert claim_output(storage, spec) is False
    assert all_files(out_dir) == ["_job.json"]
    record = json.loads((out_dir / "_job.json").read_text())
    assert record["fingerprint"] == spec.fingerprint()
    assert record["determined_by"] == spec.fingerprint_fields()
    assert record["format"] == JOB_FILE_FORMAT == 3
    assert "koala_batch_version" in record


def test_claim_of_an_existing_empty_directory(storage, out_dir):
    out_dir.mkdir()
    (out_dir / "shards").mkdir()  # empty directories are not files
    assert claim_output(storage, make_spec(out_dir)) is False


def test_second_claim_with_the_same_spec_resumes(storage, out_dir):
    spec = make_spec(out_dir)
    claim_output(storage, spec)
    shard = write_shard(spec, ["a", "b"])

    assert claim_output(storage, spec) is True
    # Resuming keeps what was committed.
    assert all_files(out_dir) == sorted(
        ["_job.json", f"manifests/{shard}.parquet", f"shards/{shard}.tar"]
    )


def test_resume_ignores_what_does_not_change_the_images(storage, out_dir):
    claim_output(storage, make_spec(out_dir))
    assert (
        claim_output(storage, make_spec(out_dir, compute={"batch_size": 16, "actors": 2})) is True
    )


def test_a_png_output_resumes_under_another_quality_a_jpeg_one_does_not(tmp_path):
    # Quality changes no byte of a (lossless) PNG; it does change a JPEG's.
    png, jpeg = tmp_path / "png", tmp_path / "jpeg"
    claim_output(Storage(str(png)), make_spec(png))
    claim_output(Storage(str(jpeg)), make_spec(jpeg, output={"image_format": "jpeg"}))

    assert claim_output(Storage(str(png)), make_spec(png, output={"quality": 50})) is True
    with pytest.raises(OutputConflictError, match=r"changed: quality"):
        claim_output(
            Storage(str(jpeg)), make_spec(jpeg, output={"image_format": "jpeg", "quality": 50})
        )


def test_resume_leaves_the_success_record_to_the_run(storage, out_dir):
    # A rerun that is then refused (or has nothing to do) must not unmake a complete
    # output: the run removes _SUCCESS only once it is about to change the output.
    spec = make_spec(out_dir)
    claim_output(storage, spec)
    write_success(storage, {"status": "succeeded"})

    assert claim_output(storage, spec) is True
    assert (out_dir / "_SUCCESS").exists()


def test_of_claims_racing_for_a_new_output_exactly_one_creates_it(storage, out_dir):
    outcomes = race_for_claim(storage, make_spec(out_dir), racers=6)

    # The others either lost the create (refused) or came late enough to see the winner's
    # _job.json and take the output over (resumed; the winner's writers then stop).
    assert outcomes.count("created") == 1, outcomes
    assert all_files(out_dir) == ["_job.json"]


def test_job_file_records_the_versions_that_decide_pixels(storage, out_dir):
    import diffusers
    import torch
    import transformers

    claim_output(storage, make_spec(out_dir))
    versions = json.loads((out_dir / "_job.json").read_text())["versions"]
    assert versions == {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def _rewrite_job_versions(out_dir: Path, **versions: str) -> None:
    job = json.loads((out_dir / "_job.json").read_text())
    job["versions"].update(versions)
    (out_dir / "_job.json").write_text(json.dumps(job))


def test_resume_under_other_library_versions_says_so(storage, out_dir, caplog):
    import torch

    spec = make_spec(out_dir)
    claim_output(storage, spec)
    _rewrite_job_versions(out_dir, torch="1.0.0", diffusers="0.1.0")

    with caplog.at_level("WARNING", logger="koala_batch.output.commit"):
        assert claim_output(storage, spec) is True  # allowed: the spec is the same
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"torch 1.0.0 -> {torch.__version__}" in warning
    assert "diffusers 0.1.0 -> " in warning and "transformers" not in warning
    assert "may differ" in warning
    # The new run records the versions it runs with.
    assert json.loads((out_dir / "_job.json").read_text())["versions"]["torch"] == torch.__version__


def test_resume_under_the_same_versions_is_quiet(storage, out_dir, caplog):
    spec = make_spec(out_dir)
    claim_output(storage, spec)
    with caplog.at_level("WARNING", logger="koala_batch.output.commit"):
        assert claim_output(storage, spec) is True
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []


def test_claim_with_a_different_seed_is_refused_naming_seed(storage, out_dir):
    claim_output(storage, make_spec(out_dir))
    before = (out_dir / "_job.json").read_bytes()

    with pytest.raises(OutputConflictError) as info:
        claim_output(storage, make_spec(out_dir, generation={"seed": 8}))
    message = str(info.value)
    assert "seed" in message
    assert "steps" not in message  # only what changed is named
    assert (out_dir / "_job.json").read_bytes() == before  # the other job's record is kept


def test_claim_with_several_changes_names_each(storage, out_dir):
    claim_output(storage, make_spec(out_dir))
    with pytest.raises(OutputConflictError) as info:
        claim_output(
            storage, make_spec(out_dir, generation={"steps": 3}, output={"image_format": "webp"})
        )
    assert "steps" in str(info.value) and "image_format" in str(info.value)


def test_overwrite_deletes_own_files_and_claims_afresh(storage, out_dir):
    old = make_spec(out_dir)
    claim_output(storage, old)
    write_shard(old, ["a", "b"])
    write_success(storage, {"status": "succeeded"})
    (out_dir / "shards" / "000000000009-deadbeef.tar.1234.partial").write_bytes(b"half")
    new = make_spec(out_dir, generation={"seed": 8})

    assert claim_output(storage, new, overwrite=True) is False

    assert all_files(out_dir) == ["_job.json"]
    assert json.loads((out_dir / "_job.json").read_text())["fingerprint"] == new.fingerprint()


def test_overwrite_of_an_empty_prefix_is_a_fresh_claim(storage, out_dir):
    assert claim_output(storage, make_spec(out_dir), overwrite=True) is False
    assert all_files(out_dir) == ["_job.json"]


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(
    "foreign",
    [
        "notes.txt",
        "shards/readme.md",
        "manifests/x.csv",
        "shards/nested/a.tar",
        "data/part-0.parquet",
        # Named like koala-batch's files but not with its shard names: a user's.
        "shards/my-backup.tar",
        "shards/extra.tar",
        "manifests/my_analysis.parquet",
        "manifests/1-deadbeef.parquet",
        "shards/backup.tar.1234.partial",
    ],
)
def test_foreign_files_are_refused_and_left_untouched(storage, out_dir, foreign, overwrite):
    spec = make_spec(out_dir)
    claim_output(storage, spec)
    shard = write_shard(spec, ["a"])
    write_success(storage, {"status": "succeeded"})
    path = out_dir / foreign
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"someone else's data")
    before = {name: (out_dir / name).read_bytes() for name in all_files(out_dir)}

    with pytest.raises(OutputConflictError) as info:
        claim_output(storage, spec, overwrite=overwrite)

    assert foreign in str(info.value)
    # Nothing deleted, not even the complete output's _SUCCESS.
    assert {name: (out_dir / name).read_bytes() for name in all_files(out_dir)} == before
    assert f"shards/{shard}.tar" in before and "_SUCCESS" in before


def test_foreign_file_in_an_unclaimed_prefix_writes_nothing(storage, out_dir):
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("mine")

    with pytest.raises(OutputConflictError, match="notes.txt"):
        claim_output(storage, make_spec(out_dir))
    assert all_files(out_dir) == ["notes.txt"]
    assert (out_dir / "notes.txt").read_text() == "mine"


def test_koala_files_without_a_job_file_are_refused(storage, out_dir):
    spec = make_spec(out_dir)
    write_shard(spec, ["a"])  # shards and manifests, but never claimed

    with pytest.raises(OutputConflictError, match="_job.json"):
        claim_output(storage, spec)
    assert "_job.json" not in all_files(out_dir)


def test_unreadable_job_file_is_refused(storage, out_dir):
    out_dir.mkdir()
    (out_dir / "_job.json").write_text("{not json")
    with pytest.raises(OutputConflictError, match="unreadable"):
        claim_output(storage, make_spec(out_dir))
    assert (out_dir / "_job.json").read_text() == "{not json"


def test_half_written_job_file_is_koala_batch_own(storage, out_dir):
    spec = make_spec(out_dir)
    claim_output(storage, spec)
    (out_dir / "_job.json.0123abcd.partial").write_text("{")
    assert claim_output(storage, spec) is True


# ---------------------------------------------------------------------------------------
# load_committed


def test_load_committed_reads_keys_and_stats_from_manifests(storage, out_dir):
    spec = make_spec(out_dir)
    claim_output(storage, spec)
    first = encoded_table(spec, ["a", "b", "c"], errors={1})
    second = encoded_table(spec, ["d", "e"], first_ordinal=3)
    summaries = [WriteShard(spec)(first).to_pylist()[0], WriteShard(spec)(second).to_pylist()[0]]

    state = load_committed(storage)

    assert len(state.keys) == 5  # error rows included
    assert all(sample_key(row_id, 0) in state.keys for row_id in "abcde")
    assert sample_key("f", 0) not in state.keys and sample_key("a", 1) not in state.keys
    assert set(state.shards) == {s["shard"] for s in summaries}
    for summary in summaries:
        # the same stats; the run's own timing is known only to the run that wrote it
        stable = {k: v for k, v in summary.items() if k not in RUN_FIELDS}
        assert state.shards[summary["shard"]] == {
            **stable,
            "committed_at": None,
            "generated_at": None,
        }
        assert (
            summary["committed_at"] is not None and len(summary["generated_at"]) == summary["rows"]
        )
    assert state.images == 5


def test_load_committed_of_an_empty_output(storage, out_dir):
    state = load_committed(storage)
    assert len(state.keys) == 0
    assert state.shards == {}
    assert state.images == 0


def test_tar_without_manifest_is_not_committed(storage, out_dir):
    spec = make_spec(out_dir)
    shard = write_shard(spec, ["a", "b"])
    (out_dir / "manifests" / f"{shard}.parquet").unlink()

    assert len(load_committed(storage).keys) == 0


def test_committed_shards_are_checked_against_the_listing(storage, out_dir):
    spec = make_spec(out_dir)
    good = write_shard(spec, ["a", "b"])
    lost = write_shard(spec, ["c"], first_ordinal=2)
    cut = write_shard(spec, ["d"], first_ordinal=3)
    garbled = write_shard(spec, ["e"], first_ordinal=4)
    (out_dir / "shards" / f"{lost}.tar").unlink()
    tar = out_dir / "shards" / f"{cut}.tar"
    size = tar.stat().st_size
    tar.write_bytes(tar.read_bytes()[:512])
    (out_dir / "manifests" / f"{garbled}.parquet").write_bytes(b"PAR1 no footer")

    state = load_committed(storage)

    assert set(state.shards) == {good}
    assert state.damaged == {
        lost: "its tar is missing",
        cut: f"its tar has 512 bytes, its manifest records {size}",
        garbled: state.damaged[garbled],
    }
    assert state.damaged[garbled].startswith("its manifest is unreadable (")
    # Damaged shards' keys are not committed: their rows are generated again.
    assert [row_id for row_id in "abcde" if sample_key(row_id, 0) in state.keys] == ["a", "b"]

    uncommit(storage, sorted(state.damaged))
    assert all_files(out_dir) == sorted([f"manifests/{good}.parquet", f"shards/{good}.tar"])


def test_damage_beyond_the_input_is_what_the_input_cannot_make_again(storage, out_dir):
    spec = make_spec(out_dir)
    in_input = write_shard(spec, ["a", "b"])
    half_gone = write_shard(spec, ["c", "d"], first_ordinal=2)
    garbled = write_shard(spec, ["e"], first_ordinal=4)
    for shard in (in_input, half_gone):
        (out_dir / "shards" / f"{shard}.tar").unlink()
    (out_dir / "manifests" / f"{garbled}.parquet").write_bytes(b"PAR1 no footer")
    state = load_committed(storage)
    assert state.damaged_keys == {
        in_input: [sample_key("a", 0), sample_key("b", 0)],
        half_gone: [sample_key("c", 0), sample_key("d", 0)],
    }
    # The input (a sliding window) still has rows a, b and c; d and e left it.
    planned = KeySet.from_keys([sample_key(row_id, 0) for row_id in "abc"])

    beyond = damage_beyond_input(state, planned)

    assert beyond == {
        half_gone: "its tar is missing; 1 of its 2 images are of rows not in the input",
        garbled: f"{state.damaged[garbled]}; which rows it held is unknown",
    }
    everything = KeySet.from_keys([sample_key(row_id, 0) for row_id in "abcde"])
    assert list(damage_beyond_input(state, everything)) == [garbled]


def test_files_shards_taken_out_leave_no_empty_folder(storage, out_dir):
    # A reader walking shards/*/ (or datasets' imagefolder) would take one for a shard.
    spec = make_spec(out_dir, output={"format": "files"})
    kept = write_shard(spec, ["a"])
    leftover = write_shard(spec, ["b"], first_ordinal=1)
    uncommitted = write_shard(spec, ["c"], first_ordinal=2)
    (out_dir / "manifests" / f"{leftover}.parquet").unlink()
    assert (out_dir / "shards" / leftover / "metadata.parquet").exists()

    removed = remove_leftovers(storage)
    uncommit(storage, [uncommitted])

    assert removed and all(path.startswith(f"shards/{leftover}/") for path in removed)
    assert sorted(path.name for path in (out_dir / "shards").iterdir()) == [kept]
    assert claim_output(storage, spec, overwrite=True) is False
    assert not (out_dir / "shards").exists() or not any((out_dir / "shards").iterdir())


def test_a_manifest_recording_no_format_or_size_is_damaged(storage, out_dir):
    # Every manifest this job-file format writes records both; one without them is not
    # trusted, so its rows are generated again.
    spec = make_spec(out_dir)
    shard = write_shard(spec, ["a"])
    path = out_dir / "manifests" / f"{shard}.parquet"
    table = pq.read_table(path)
    assert recorded_data_bytes(table.schema) == (out_dir / "shards" / f"{shard}.tar").stat().st_size
    assert load_committed(storage).damaged == {}
    pq.write_table(table.replace_schema_metadata(None), path)

    assert load_committed(storage).damaged == {
        shard: "its manifest records no known output format (None)"
    }


def test_duplicate_keys_across_manifests_are_refused(storage, out_dir):
    spec = make_spec(out_dir)
    first = write_shard(spec, ["a", "b"])
    second = write_shard(spec, ["b", "c"], first_ordinal=10)  # another shard, key of "b" again
    write_shard(spec, ["d"], first_ordinal=20)

    with pytest.raises(OutputConflictError, match="repeat keys") as refused:
        load_committed(storage)
    assert f"({first}, {second} share some)" in str(refused.value)


# ---------------------------------------------------------------------------------------
# remove_leftovers


def test_remove_leftovers_deletes_orphans_and_keeps_committed_shards(storage, out_dir):
    spec = make_spec(out_dir)
    claim_output(storage, spec)
    kept = write_shard(spec, ["a", "b"])
    orphan = write_shard(spec, ["c", "d"], first_ordinal=2)
    (out_dir / "manifests" / f"{orphan}.parquet").unlink()  # a write cut before its manifest
    partials = [
        "shards/000000000009-00000000.tar.ab12.partial",
        "manifests/000000000009-00000000.parquet.cd34.partial",
        "_job.json.ef56.partial",
    ]
    for name in partials:
        (out_dir / name).write_bytes(b"half")

    removed = remove_leftovers(storage)

    assert sorted(removed) == sorted([f"shards/{orphan}.tar", *partials])
    assert all_files(out_dir) == sorted(
        ["_job.json", f"manifests/{kept}.parquet", f"shards/{kept}.tar"]
    )


def test_remove_leftovers_with_nothing_to_remove(storage, out_dir):
    spec = make_spec(out_dir)
    claim_output(storage, spec)
    shard = write_shard(spec, ["a"])
    before = all_files(out_dir)

    assert remove_leftovers(storage) == []
    assert all_files(out_dir) == before
    assert f"shards/{shard}.tar" in before


def test_remove_leftovers_never_touches_manifests(storage, out_dir):
    spec = make_spec(out_dir)
    shard = write_shard(spec, ["a"])
    (out_dir / "shards" / f"{shard}.tar").unlink()  # committed manifest, lost tar

    assert remove_leftovers(storage) == []
    assert (out_dir / "manifests" / f"{shard}.parquet").exists()


def test_write_success_is_the_record(storage, out_dir):
    write_success(storage, {"status": "succeeded", "counts": {"images_ok": 3}})
    assert json.loads((out_dir / "_SUCCESS").read_text()) == {
        "status": "succeeded",
        "counts": {"images_ok": 3},
    }


# ---------------------------------------------------------------------------------------
# Fencing writers of a superseded run, and retiring what slips through


def test_writer_of_a_superseded_run_commits_nothing(storage, out_dir):
    from koala_batch.errors import RunSupersededError

    spec = make_spec(out_dir)
    claim_output(storage, spec, run_id="run-1")
    claim_output(storage, spec, run_id="run-2")  # a rerun took the output over

    with pytest.raises(RunSupersededError, match="belongs to run run-2, not run-1"):
        WriteShard(spec, run_id="run-1")(encoded_table(spec, ["a", "b"]))
    assert all_files(out_dir) == ["_job.json"]

    summary = WriteShard(spec, run_id="run-2")(encoded_table(spec, ["a", "b"]))
    assert summary.column("rows")[0].as_py() == 2


def test_late_duplicate_shard_is_retired_and_a_late_stranger_refused(storage, out_dir):
    from koala_batch.output.commit import retire_late_duplicates

    spec = make_spec(out_dir)
    claim_output(storage, spec)
    known = {write_shard(spec, ["a", "b"]), write_shard(spec, ["c", "d"], first_ordinal=2)}
    late = write_shard(spec, ["b", "c"], first_ordinal=1)  # rows this run also committed

    assert retire_late_duplicates(storage, known) == [late]
    assert not (out_dir / "manifests" / f"{late}.parquet").exists()
    assert not (out_dir / "shards" / f"{late}.tar").exists()
    assert sorted(p.stem for p in (out_dir / "manifests").glob("*.parquet")) == sorted(known)
    assert retire_late_duplicates(storage, known) == []

    stranger = write_shard(spec, ["d", "e"], first_ordinal=3)  # "e" is in no known shard
    with pytest.raises(OutputConflictError, match="holds images this run did not produce"):
        retire_late_duplicates(storage, known)
    assert (out_dir / "manifests" / f"{stranger}.parquet").exists()


# ---------------------------------------------------------------------------------------
# commit_timeline


def test_commit_timeline_counts_the_most_images_waiting_for_a_commit():
    from koala_batch.output.commit import commit_timeline

    written = [
        {"rows": 2, "committed_at": 103.0, "generated_at": [101.0, 102.0]},
        # generated while the first shard was still being written
        {"rows": 3, "committed_at": 107.0, "generated_at": [102.5, 104.0, 106.0]},
        {"rows": 1, "committed_at": 108.0, "generated_at": [107.0]},
    ]
    timeline = commit_timeline(100.0, written)
    assert timeline == {
        "shards_committed": 3,
        "first_image_s": 1.0,
        "last_image_s": 7.0,
        "first_commit_s": 3.0,
        "last_commit_s": 8.0,
        # at 107: the second shard's three images and the third shard's first, which
        # counts as generated before the second shard's commit at the same moment
        "max_uncommitted_images": 4,
    }


def test_commit_timeline_of_a_final_burst_counts_every_image():
    from koala_batch.output.commit import commit_timeline

    written = [
        {"rows": 2, "committed_at": 50.0 + i, "generated_at": [10.0 * i, 10.0 * i + 1]}
        for i in range(4)
    ]
    assert commit_timeline(0.0, written)["max_uncommitted_images"] == 8


def test_commit_timeline_skips_shards_committed_by_an_earlier_run():
    from koala_batch.output.commit import commit_timeline

    earlier = {"rows": 5, "committed_at": None, "generated_at": None}
    assert commit_timeline(0.0, [earlier]) == {"shards_committed": 0}
