"""Retrying failed images: which row of a key stands, and manifests rewritten without the
others (local Storage, shards written by the real writer from tables built in memory)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from koala_batch.errors import OutputConflictError, RunSupersededError
from koala_batch.keys import KeySet, sample_key
from koala_batch.output.commit import (
    RowVersion,
    claim_output,
    load_committed,
    newest_row,
    release_failed,
    retire_superseded_rows,
    retired_rows,
    retriable_failures,
)
from koala_batch.output.layout import (
    DATA_BYTES_METADATA,
    FORMAT_METADATA,
    manifest_path,
    recorded_stats,
    tar_path,
)
from koala_batch.output.verify import verify_output
from koala_batch.stages.write import WriteShard
from koala_batch.storage import Storage
from tests.unit.conftest import encoded_table, make_spec


@pytest.fixture
def storage(out_dir) -> Storage:
    return Storage(str(out_dir))


@pytest.fixture
def spec(out_dir, storage):
    spec = make_spec(out_dir)
    claim_output(storage, spec, run_id="run-1")
    return spec


def all_files(root: Path) -> list[str]:
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())


def write_shard(spec, ids, *, first_ordinal=0, errors=frozenset(), later_by=0.0) -> str:
    """Commit one shard of `ids` (ordinals from `first_ordinal`); `later_by` seconds added
    to its rows' generation moments (a retry generates later)."""
    table = encoded_table(spec, ids, first_ordinal=first_ordinal, errors=errors)
    moments = [moment + later_by for moment in table.column("generated_at").to_pylist()]
    index = table.schema.get_field_index("generated_at")
    table = table.set_column(index, "generated_at", pa.array(moments, pa.float64()))
    return WriteShard(spec, run_id="run-1")(table).column("shard")[0].as_py()


def manifest(out_dir: Path, shard: str) -> pa.Table:
    return pq.read_table(out_dir / manifest_path(shard))


def key(row_id: str) -> str:
    return sample_key(row_id, 0)


# ---------------------------------------------------------------------------------------
# newest_row: the one rule


def test_an_ok_row_stands_over_error_rows_generated_later():
    ok = RowVersion("000000000000-aaaaaaaa", ok=True, generated_at=100.0)
    later_error = RowVersion("000000000009-bbbbbbbb", ok=False, generated_at=200.0)
    assert newest_row([later_error, ok]) == ok
    assert newest_row([ok, later_error]) == ok


def test_among_error_rows_the_one_generated_later_stands():
    old = RowVersion("000000000009-bbbbbbbb", ok=False, generated_at=100.0)
    new = RowVersion("000000000000-aaaaaaaa", ok=False, generated_at=200.0)
    unknown = RowVersion("000000000099-cccccccc", ok=False, generated_at=None)
    assert newest_row([old, new, unknown]) == new
    # A manifest that does not say when comes last; between two such, the shard name.
    assert newest_row([unknown, old]) == old
    other = RowVersion("000000000098-dddddddd", ok=False, generated_at=None)
    assert newest_row([unknown, other]) == newest_row([other, unknown]) == unknown


# ---------------------------------------------------------------------------------------
# load_committed with a retry cut short


def test_a_key_committed_as_an_error_and_again_counts_once(spec, storage, out_dir):
    old = write_shard(spec, ["a", "b", "c"], errors={1, 2})
    new = write_shard(spec, ["b"], first_ordinal=1, later_by=60)

    state = load_committed(storage)

    assert state.superseded == {old: [key("b")]}
    assert state.failed == {key("c"): old}  # b's error row is superseded by its ok row
    assert state.images == 3 and state.rows == 4  # keys, not rows
    assert set(state.shards) == {old, new}


def test_of_two_error_rows_the_later_one_stands(spec, storage):
    old = write_shard(spec, ["a", "b"], errors={1})
    new = write_shard(spec, ["b"], first_ordinal=1, errors={0}, later_by=60)

    state = load_committed(storage)

    assert state.superseded == {old: [key("b")]}
    assert state.failed == {key("b"): new}


def test_the_later_row_stands_whatever_the_shard_names(spec, storage):
    write_shard(spec, ["a", "b"], errors={1})
    old = write_shard(spec, ["c", "d"], first_ordinal=2, errors={0})
    # The retry of b and c sorts before c's old shard by name; it was generated later.
    new = write_shard(spec, ["b", "c"], first_ordinal=1, errors={0, 1}, later_by=60)
    assert new < old

    state = load_committed(storage)

    assert state.failed[key("c")] == new
    assert state.superseded[old] == [key("c")]


def test_a_key_with_two_ok_rows_is_still_refused(spec, storage):
    first = write_shard(spec, ["a", "b"], errors={1})
    second = write_shard(spec, ["b", "c"], first_ordinal=10)
    third = write_shard(spec, ["c"], first_ordinal=20, later_by=60)

    with pytest.raises(OutputConflictError, match="repeat keys") as refused:
        load_committed(storage)
    # b (error, then ok) alone would be a retry cut short; c is committed as two images.
    assert f"({second}, {third} share some)" in str(refused.value)
    assert first not in str(refused.value)


# ---------------------------------------------------------------------------------------
# retire_superseded_rows


def test_superseded_rows_leave_their_manifest_and_nothing_else(spec, storage, out_dir):
    old = write_shard(spec, ["a", "b", "c", "d"], errors={1, 3})
    tar_before = (out_dir / tar_path(old)).read_bytes()
    before = manifest(out_dir, old)
    new = write_shard(spec, ["b"], first_ordinal=1, later_by=60)
    state = load_committed(storage)

    retired = retire_superseded_rows(storage, state.superseded, run_id="run-1")

    assert (retired.rows, retired.rewritten, retired.uncommitted) == (1, (old,), ())
    after = manifest(out_dir, old)
    assert after.column("key").to_pylist() == [key("a"), key("c"), key("d")]
    assert after.schema.remove_metadata() == before.schema.remove_metadata()
    assert (out_dir / tar_path(old)).read_bytes() == tar_before  # the data stay as they are
    metadata = after.schema.metadata
    for recorded in (FORMAT_METADATA, DATA_BYTES_METADATA):
        assert metadata[recorded] == before.schema.metadata[recorded]
    [made_from] = before.filter(pc.equal(before.column("key"), key("b")))["made_from"].to_pylist()
    assert retired_rows(after.schema) == {key("b"): (1, made_from)}
    stats = recorded_stats(after.schema)
    if stats is not None:  # the counts follow the rows
        assert (stats["rows"], stats["ok"], stats["errors"]) == (3, 2, 1)
    settled = load_committed(storage)
    assert settled.superseded == {}
    assert settled.failed == {key("d"): old}
    assert settled.images == settled.rows == 4
    assert settled.shards[old]["rows"] == 3 and settled.shards[new]["ok"] == 1
    # A rewritten manifest verifies like any other (its name checked with the retired row).
    report = verify_output(str(out_dir))
    assert report.ok, report.format()
    assert (report.rows_checked, report.rows_failed) == (4, 1)


@pytest.mark.parametrize("output_format", ["webdataset", "parquet", "files"])
def test_in_every_format_a_retry_rewrites_only_manifests(output_format, storage, out_dir):
    spec = make_spec(out_dir, output={"format": output_format})
    claim_output(storage, spec, run_id="run-1")
    old = write_shard(spec, ["a", "b", "c"], errors={1, 2})
    emptied = write_shard(spec, ["d"], first_ordinal=3, errors={0})
    data = {path: path.read_bytes() for path in (out_dir / "shards").rglob("*") if path.is_file()}
    new = write_shard(spec, ["b", "d"], first_ordinal=1, errors={1}, later_by=60)

    retired = retire_superseded_rows(storage, load_committed(storage).superseded, "run-1")

    assert (retired.rewritten, retired.uncommitted) == ((old,), (emptied,))
    assert manifest(out_dir, old).column("key").to_pylist() == [key("a"), key("c")]
    for path, before in data.items():  # the emptied shard's data go with it, no other
        if emptied in str(path):
            assert not path.exists(), path
        else:
            assert path.read_bytes() == before, path
    settled = load_committed(storage)
    assert settled.failed == {key("c"): old, key("d"): new}
    report = verify_output(str(out_dir))
    assert report.ok, report.format()
    assert (report.rows_checked, report.rows_failed) == (4, 2)


def test_a_shard_left_without_rows_is_uncommitted(spec, storage, out_dir):
    old = write_shard(spec, ["a", "b"], errors={0, 1})
    kept = write_shard(spec, ["c"], first_ordinal=2)
    now_ok = write_shard(spec, ["a"], later_by=60)
    failed_again = write_shard(spec, ["b"], first_ordinal=1, errors={0}, later_by=60)

    retired = retire_superseded_rows(storage, load_committed(storage).superseded, "run-1")

    assert (retired.rows, retired.rewritten, retired.uncommitted) == (2, (), (old,))
    assert not (out_dir / manifest_path(old)).exists()
    assert not (out_dir / tar_path(old)).exists()
    settled = load_committed(storage)
    assert sorted(settled.shards) == sorted([kept, now_ok, failed_again])
    assert settled.failed == {key("b"): failed_again}


def test_a_run_that_lost_the_output_rewrites_nothing(spec, storage, out_dir):
    old = write_shard(spec, ["a", "b"], errors={1})
    write_shard(spec, ["b"], first_ordinal=1, later_by=60)
    before = (out_dir / manifest_path(old)).read_bytes()
    claim_output(storage, spec, run_id="run-2")  # another run took the output over

    with pytest.raises(RunSupersededError, match="belongs to run run-2, not run-1"):
        retire_superseded_rows(storage, load_committed(storage).superseded, "run-1")
    assert (out_dir / manifest_path(old)).read_bytes() == before


# ---------------------------------------------------------------------------------------
# release_failed


def test_release_failed_forgets_failed_keys_and_removes_nothing(spec, storage, out_dir):
    mixed = write_shard(spec, ["a", "b"], errors={1})
    all_errors = write_shard(spec, ["c", "d"], first_ordinal=2, errors={0, 1})
    state = load_committed(storage)
    assert state.failed == {key("b"): mixed, key("c"): all_errors, key("d"): all_errors}
    files = all_files(out_dir)

    released = release_failed(state)

    assert [row_id for row_id in "abcd" if key(row_id) in released.keys] == ["a"]
    assert set(released.shards) == {mixed, all_errors}
    # Every error row stays committed until its replacement is: a retry killed now loses
    # no failure record.
    assert all_files(out_dir) == files
    # A new shard of the same keys, now ok, commits beside the error shard (another name),
    # and the error rows it replaces are retired once it is there.
    replaced = write_shard(spec, ["c", "d"], first_ordinal=2, later_by=60)
    assert replaced != all_errors
    settled = load_committed(storage)
    assert {shard: set(keys) for shard, keys in settled.superseded.items()} == {
        all_errors: {key("c"), key("d")}
    }
    retire_superseded_rows(storage, settled.superseded, "run-1")
    after = load_committed(storage)
    assert set(after.shards) == {mixed, replaced} and after.failed == {key("b"): mixed}


def test_a_retry_that_fails_again_alike_keeps_the_error_shard(spec, storage, out_dir):
    all_errors = write_shard(spec, ["c", "d"], errors={0, 1})
    release_failed(load_committed(storage))

    # The same rows failing the same way from the same input make the same shard: the
    # writer finds it committed and keeps it.
    assert write_shard(spec, ["c", "d"], errors={0, 1}, later_by=60) == all_errors
    assert set(load_committed(storage).failed) == {key("c"), key("d")}


def test_an_accumulating_retry_keeps_the_error_rows_the_input_no_longer_plans(
    spec, storage, out_dir
):
    gone = write_shard(spec, ["old-1", "old-2"], errors={0, 1})  # rows of an earlier input
    mixed = write_shard(spec, ["a", "old-3"], first_ordinal=2, errors={0, 1})
    state = load_committed(storage)
    planned = KeySet.from_keys([key("a"), key("b")])  # this input: a and b only

    retrying = retriable_failures(state, planned)
    released = release_failed(state, retrying)

    assert retrying == {key("a"): mixed}
    # Nothing can generate old-* again: their error rows, and their shards, stay.
    assert (out_dir / manifest_path(gone)).exists()
    assert (out_dir / manifest_path(mixed)).exists()
    assert set(released.shards) == {gone, mixed}
    assert [k for k in map(key, ["old-1", "old-2", "old-3", "a"]) if k in released.keys] == [
        key("old-1"),
        key("old-2"),
        key("old-3"),
    ]
    assert retriable_failures(state, None) == state.failed  # without accumulate: all


def test_release_failed_wants_superseded_rows_retired_first(spec, storage):
    write_shard(spec, ["a", "b"], errors={1})
    write_shard(spec, ["b"], first_ordinal=1, later_by=60)
    with pytest.raises(ValueError, match="retire the superseded rows first"):
        release_failed(load_committed(storage))


# ---------------------------------------------------------------------------------------
# verify


def test_verify_names_both_shards_of_a_retry_cut_short(spec, storage, out_dir):
    old = write_shard(spec, ["a", "b"], errors={1})
    new = write_shard(spec, ["b"], first_ordinal=1, later_by=60)

    report = verify_output(str(out_dir))

    assert not report.ok
    [problem] = [p for p in report.problems if key("b") in p]
    assert f"in shard {old} and shard {new}" in problem
    assert "retry of failed images was cut short" in problem and "--retry-failed" in problem


def test_verify_finds_a_retired_row_that_no_manifest_holds(spec, storage, out_dir):
    old = write_shard(spec, ["a", "b"], errors={1})
    new = write_shard(spec, ["b"], first_ordinal=1, later_by=60)
    retire_superseded_rows(storage, load_committed(storage).superseded, "run-1")
    (out_dir / manifest_path(new)).unlink()  # the newer row lost

    report = verify_output(str(out_dir))

    assert any(
        f"shard {old}: a retry took the error row of key {key('b')}" in p for p in report.problems
    ), report.format()


def test_verify_refuses_a_rewritten_manifest_that_lost_rows_silently(spec, storage, out_dir):
    shard = write_shard(spec, ["a", "b", "c"], errors={1})
    path = out_dir / manifest_path(shard)
    table = pq.read_table(path)
    # Rows taken out without saying so (no retired-rows record): the name no longer fits.
    pq.write_table(table.slice(0, 2), path)

    report = verify_output(str(out_dir))

    assert any("rows were added, removed" in p for p in report.problems), report.format()


def test_run_takes_retry_failed_from_the_command_line():
    from koala_batch.cli.main import build_parser

    assert build_parser().parse_args(["run", "job.yaml", "--retry-failed"]).retry_failed
    assert not build_parser().parse_args(["run", "job.yaml"]).retry_failed


def test_retired_rows_of_a_manifest_never_rewritten_is_empty(spec, out_dir):
    shard = write_shard(spec, ["a"])
    assert retired_rows(manifest(out_dir, shard).schema) == {}
