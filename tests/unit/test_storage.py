"""The storage layer on a local directory: atomic writes, confined paths, listing, retries."""

from __future__ import annotations

from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem

from koala_batch.errors import OutputUnwritableError, StorageError
from koala_batch.output.commit import check_output, claim_output, remove_leftovers
from koala_batch.output.layout import FileKind, classify
from koala_batch.storage import Storage, is_transient, with_retries
from tests.unit.conftest import make_spec, race


@pytest.fixture
def storage(out_dir) -> Storage:
    return Storage(str(out_dir))


def all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------
# Writes and reads


def test_write_bytes_creates_parents_and_leaves_no_partial(storage, out_dir):
    storage.write_bytes("manifests/a.parquet", b"hello")

    assert (out_dir / "manifests" / "a.parquet").read_bytes() == b"hello"
    assert all_files(out_dir) == ["manifests/a.parquet"]


def test_write_bytes_replaces_an_existing_object_whole(storage, out_dir):
    storage.write_bytes("_job.json", b"x" * 10_000)
    storage.write_bytes("_job.json", b"short")

    assert (out_dir / "_job.json").read_bytes() == b"short"
    assert all_files(out_dir) == ["_job.json"]


def test_write_bytes_goes_through_a_rename(storage, out_dir):
    # Atomic on a local disk means: write aside, then rename over the target. A reader
    # holding the old file keeps reading the old bytes (the inode changes).
    storage.write_bytes("f.bin", b"old")
    with open(out_dir / "f.bin", "rb") as old_reader:
        storage.write_bytes("f.bin", b"new")
        assert old_reader.read() == b"old"
    assert (out_dir / "f.bin").read_bytes() == b"new"


def test_upload_file_copies_and_leaves_no_partial(storage, out_dir, tmp_path):
    local = tmp_path / "local.tar"
    local.write_bytes(b"tar bytes")

    storage.upload_file(str(local), "shards/x.tar")

    assert (out_dir / "shards" / "x.tar").read_bytes() == b"tar bytes"
    assert all_files(out_dir) == ["shards/x.tar"]
    assert local.exists()  # a copy, not a move


def test_read_exists_and_remove(storage):
    assert not storage.exists("a.txt")
    storage.write_bytes("a.txt", b"data")
    assert storage.exists("a.txt")
    assert storage.read_bytes("a.txt") == b"data"
    with storage.open_read("a.txt") as handle:
        assert handle.read() == b"data"
    storage.remove("a.txt")
    assert not storage.exists("a.txt")
    storage.remove("a.txt")  # removing what is gone is fine


def test_read_of_a_missing_file_is_file_not_found(storage):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("missing.bin")


def test_url_carries_the_protocol(storage, out_dir):
    assert storage.url("shards/x.tar") == f"file://{out_dir}/shards/x.tar"


# ---------------------------------------------------------------------------------------
# Paths stay under the root


@pytest.mark.parametrize(
    "relative",
    ["../escape.txt", "a/../../escape.txt", "..", "../out2/x", "shards/../../../etc/passwd"],
)
def test_path_refuses_escapes(storage, relative):
    with pytest.raises(StorageError, match="escapes"):
        storage.path(relative)


def test_path_refuses_absolute_paths_outside_the_root(storage):
    with pytest.raises(StorageError, match="escapes"):
        storage.path("/etc/passwd")


def test_sibling_with_a_common_prefix_is_outside(storage, out_dir):
    # /x/out2 starts with "/x/out" but is not under it.
    with pytest.raises(StorageError):
        storage.path(f"{out_dir}2/file")


def test_writes_refuse_escapes_and_write_nothing(storage, out_dir):
    with pytest.raises(StorageError):
        storage.write_bytes("../escaped.txt", b"x")
    assert not (out_dir.parent / "escaped.txt").exists()


def test_path_normalizes_inside_the_root(storage, out_dir):
    assert storage.path("shards/../manifests/a.parquet") == f"{out_dir}/manifests/a.parquet"
    assert storage.path("") == str(out_dir)
    assert storage.path(f"{out_dir}/inside.txt") == f"{out_dir}/inside.txt"


def test_root_with_trailing_slash_is_the_same_root(out_dir):
    assert Storage(f"{out_dir}/").path("a") == Storage(str(out_dir)).path("a")


# ---------------------------------------------------------------------------------------
# Listing


def test_list_files_is_sorted_names_of_files_only(storage, out_dir):
    for name in ["c.parquet", "a.parquet", "b.parquet", "b.parquet.1234.partial"]:
        storage.write_bytes(f"manifests/{name}", b"x")
    (out_dir / "manifests" / "subdir.parquet").mkdir()
    (out_dir / "manifests" / "subdir.parquet" / "nested.parquet").write_bytes(b"x")

    assert storage.list_files("manifests") == [
        "a.parquet",
        "b.parquet",
        "b.parquet.1234.partial",
        "c.parquet",
    ]
    assert storage.list_files("manifests", ".parquet") == ["a.parquet", "b.parquet", "c.parquet"]


def test_list_files_of_a_missing_directory_is_empty(storage):
    assert storage.list_files("manifests") == []
    assert storage.list_files("does/not/exist", ".tar") == []


def test_list_files_sees_new_files(storage):
    assert storage.list_files("shards") == []
    storage.write_bytes("shards/a.tar", b"x")
    assert storage.list_files("shards") == ["a.tar"]  # no stale listing cache


# ---------------------------------------------------------------------------------------
# Retries


class Flaky:
    """Raises the given errors in turn, then returns "done"; counts its calls."""

    def __init__(self, *errors: BaseException):
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


@pytest.mark.parametrize(
    "error", [OSError("reset"), ConnectionError("refused"), TimeoutError("slow")]
)
def test_transient_errors_are_retried_until_success(error):
    operation = Flaky(error, error, error)
    assert with_retries(operation, "test op", attempts=4, first_delay_s=0) == "done"
    assert operation.calls == 4


def test_retries_give_up_after_the_last_attempt():
    operation = Flaky(*[ConnectionError(f"try {i}") for i in range(5)])
    with pytest.raises(ConnectionError, match="try 2"):
        with_retries(operation, "test op", attempts=3, first_delay_s=0)
    assert operation.calls == 3


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError("gone"),
        PermissionError("denied"),
        IsADirectoryError("dir"),
        FileExistsError("there"),
    ],
)
def test_permanent_errors_are_not_retried(error):
    operation = Flaky(error)
    with pytest.raises(type(error)):
        with_retries(operation, "test op", attempts=5, first_delay_s=0)
    assert operation.calls == 1


def test_non_storage_errors_are_not_retried():
    operation = Flaky(ValueError("bug"))
    with pytest.raises(ValueError):
        with_retries(operation, "test op", attempts=5, first_delay_s=0)
    assert operation.calls == 1


def test_success_on_first_try_calls_once():
    operation = Flaky()
    assert with_retries(operation, "test op", first_delay_s=0) == "done"
    assert operation.calls == 1


def test_is_transient_classification():
    assert is_transient(OSError("x"))
    assert is_transient(ConnectionResetError("x"))
    assert not is_transient(FileNotFoundError("x"))
    assert not is_transient(PermissionError("x"))
    assert not is_transient(KeyError("x"))


# ---------------------------------------------------------------------------------------
# Probing that the output can be written


def test_check_writable_of_a_new_prefix_leaves_nothing_not_even_its_directories(tmp_path):
    Storage(str(tmp_path / "a" / "b" / "out")).check_writable("_job.json")

    assert list(tmp_path.iterdir()) == []


def test_check_writable_of_an_existing_output_leaves_it_as_it_was(storage, out_dir):
    storage.write_bytes("_job.json", b"{}")

    storage.check_writable("_job.json")

    assert all_files(out_dir) == ["_job.json"]
    assert (out_dir / "_job.json").read_bytes() == b"{}"


@pytest.mark.parametrize("below", ["out", "deep/out"])
def test_check_writable_below_a_file_names_the_output(tmp_path, below):
    in_the_way = tmp_path / "file"
    in_the_way.write_text("mine")
    storage = Storage(str(in_the_way / below))

    with pytest.raises(OutputUnwritableError) as info:
        storage.check_writable("_job.json")

    message = str(info.value)
    assert message.startswith(f"output file://{in_the_way}/{below} cannot be written (")
    assert "a file stands where a directory is needed" in message and "\n" not in message
    assert info.value.exit_code == 2
    assert in_the_way.read_text() == "mine"


def test_is_file(storage, out_dir, tmp_path):
    assert not storage.is_file("")
    storage.write_bytes("a.txt", b"x")
    assert storage.is_file("a.txt") and not storage.is_file("")
    (tmp_path / "plain").write_text("x")
    assert Storage(str(tmp_path / "plain")).is_file("")


class NoDeleteFileSystem(LocalFileSystem):
    """A local disk whose deletes are refused, as on a bucket that grants PUT only."""

    def rm_file(self, path, **kwargs):
        raise PermissionError(f"Access Denied: delete {path}")


def test_a_probe_left_behind_is_a_leftover_a_resumed_run_removes(out_dir):
    out_dir.mkdir()
    # The probe cannot be removed: it stays, named as a partial write of _job.json.
    Storage(str(out_dir), filesystem=NoDeleteFileSystem()).check_writable("_job.json")
    (probe,) = all_files(out_dir)
    assert classify(probe) == (FileKind.PARTIAL, None)

    # Neither refused as foreign nor as "koala-batch files but no _job.json".
    storage = Storage(str(out_dir))
    spec = make_spec(out_dir)
    assert check_output(storage, spec).action == "new"
    assert claim_output(storage, spec) is False
    state = check_output(storage, spec)
    assert state.action == "resume" and state.listing.leftovers == ((probe, "partial write"),)
    assert remove_leftovers(storage, state.listing) == [probe]
    assert all_files(out_dir) == ["_job.json"]


# Reconstructed after an edit of this file cut them off (same names as before).
def test_create_exclusive_creates_once(storage, out_dir):
    assert storage.create_exclusive("_job.json", b"first") is True
    assert storage.create_exclusive("_job.json", b"second") is False
    assert (out_dir / "_job.json").read_bytes() == b"first"
    # A retried create that finds its own bytes (its first attempt went through) created it.
    assert storage.create_exclusive("_job.json", b"first") is True
    assert all_files(out_dir) == ["_job.json"]


def test_create_exclusive_has_one_winner_among_racers(storage, out_dir):
    outcomes = race(lambda racer: storage.create_exclusive("_job.json", f"run{racer}".encode()), 8)

    assert outcomes.count(True) == 1, outcomes
    winner = outcomes.index(True)
    assert (out_dir / "_job.json").read_bytes() == f"run{winner}".encode()
    assert all_files(out_dir) == ["_job.json"]


class ReleasedBeforeRead(LocalFileSystem):
    """A local disk on which a read finds its file just deleted: the run whose file was in
    the way released it in between."""

    def cat_file(self, path, start=None, end=None, **kwargs):
        self.rm_file(path)
        return super().cat_file(path, start=start, end=end, **kwargs)


def test_create_exclusive_of_a_file_in_the_way_then_released_is_not_created(out_dir):
    Storage(str(out_dir)).write_bytes("_lease/000000000001.json", b"another run")
    storage = Storage(str(out_dir), filesystem=ReleasedBeforeRead())

    assert storage.create_exclusive("_lease/000000000001.json", b"this run") is False
    assert not (out_dir / "_lease" / "000000000001.json").exists()
