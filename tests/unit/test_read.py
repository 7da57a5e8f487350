"""Input listing and planning: files, prefixes, globs, lists; row groups; derived ids."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from koala_batch.errors import InputError, SpecError
from koala_batch.inputs.files import check_schema, plan_input, text_values
from koala_batch.schemas import RESERVED_COLUMNS
from koala_batch.spec import InputSpec
from koala_batch.stages.read import ReadRowGroups
from tests.unit.conftest import make_spec

FILE = "s3://bucket/prompts/part-0.parquet"


def input_spec(**fields):
    return make_spec("out", input=fields).input


def schema(**columns) -> pa.Schema:
    return pa.schema([pa.field(name, dtype) for name, dtype in columns.items()])


def write(path, prompts, row_group_size=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": prompts}), path, row_group_size=row_group_size)


@pytest.fixture
def tree(tmp_path):
    write(tmp_path / "in" / "b.parquet", ["b0", "b1", "b2"], row_group_size=2)
    write(tmp_path / "in" / "a.parquet", ["a0"])
    write(tmp_path / "in" / "nested" / "c.parquet", ["c0", "c1"])
    (tmp_path / "in" / "notes.txt").write_text("not a table")
    return tmp_path / "in"


def sources(plan):
    return [f.source for f in plan.files]


def test_prefix_lists_parquet_files_recursively_in_sorted_order(tree):
    plan = plan_input(InputSpec(uri=str(tree)))
    assert sources(plan) == ["a.parquet", "b.parquet", "nested/c.parquet"]
    assert plan.num_rows == 6


def test_glob_and_single_file_and_list(tree):
    assert sources(plan_input(InputSpec(uri=str(tree / "*.parquet")))) == ["a.parquet", "b.parquet"]
    assert sources(plan_input(InputSpec(uri=str(tree / "b.parquet")))) == ["b.parquet"]
    both = plan_input(InputSpec(uri=[str(tree / "nested"), str(tree / "a.parquet")]))
    assert sources(both) == ["c.parquet", "a.parquet"]
    assert both.num_rows == 3


def test_read_units_cover_every_row_group_with_global_ordinals(tree):
    plan = plan_input(InputSpec(uri=str(tree)))
    units = plan.read_units()
    assert [
        (u["source"], u["row_group"], u["row_offset"], u["ordinal_offset"], u["num_rows"])
        for u in units
    ] == [
        ("a.parquet", 0, 0, 0, 1),
        ("b.parquet", 0, 0, 1, 2),
        ("b.parquet", 1, 2, 3, 1),
        ("nested/c.parquet", 0, 0, 4, 2),
    ]
    reader = ReadRowGroups(InputSpec(uri=str(tree)))
    table = reader.read_unit(units[2])
    assert table.column("prompt").to_pylist() == ["b2"]
    assert table.column("row_index").to_pylist() == [2]
    assert table.column("row_ordinal").to_pylist() == [3]
    assert table.column("source").to_pylist() == ["b.parquet"]


@pytest.mark.parametrize("uri", ["missing-dir", "missing-dir/*.parquet"])
def test_nothing_to_read_is_an_error_naming_the_input(tmp_path, uri):
    with pytest.raises(InputError, match="missing-dir"):
        plan_input(InputSpec(uri=str(tmp_path / uri)))


def test_directory_without_parquet_files_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(InputError, match="matched no Parquet files"):
        plan_input(InputSpec(uri=str(tmp_path / "empty")))


# ---------------------------------------------------------------------------------------
# check_schema


def test_good_schema_passes():
    spec = input_spec(
        id_column="id",
        seed_column="seed",
        negative_prompt_column="neg",
        passthrough_columns=["category"],
    )
    check_schema(
        schema(
            prompt=pa.string(),
            id=pa.int64(),
            seed=pa.uint64(),
            neg=pa.string(),
            category=pa.string(),
            unused=pa.float32(),
        ),
        spec,
        FILE,
    )


@pytest.mark.parametrize("prompt_type", [pa.large_string(), pa.null()])
def test_prompt_column_may_be_large_string_or_all_null(prompt_type):
    check_schema(schema(prompt=prompt_type), input_spec(), FILE)


def test_missing_prompt_column_names_column_file_and_present_columns():
    with pytest.raises(InputError) as info:
        check_schema(schema(text=pa.string(), id=pa.int64()), input_spec(), FILE)
    message = str(info.value)
    assert "'prompt'" in message
    assert FILE in message
    assert "text (string)" in message
    assert "id (int64)" in message


def test_custom_prompt_column_is_the_one_required():
    spec = input_spec(prompt_column="caption")
    check_schema(schema(caption=pa.string()), spec, FILE)
    with pytest.raises(InputError, match="'caption'"):
        check_schema(schema(prompt=pa.string()), spec, FILE)


def test_prompt_column_of_int_type_is_refused():
    with pytest.raises(InputError) as info:
        check_schema(schema(prompt=pa.int64()), input_spec(), FILE)
    message = str(info.value)
    assert "'prompt'" in message and "int64" in message and FILE in message


@pytest.mark.parametrize("seed_type", [pa.string(), pa.bool_(), pa.binary()])
def test_seed_column_of_non_numeric_type_is_refused(seed_type):
    spec = input_spec(seed_column="seed")
    with pytest.raises(InputError) as info:
        check_schema(schema(prompt=pa.string(), seed=seed_type), spec, FILE)
    assert "'seed'" in str(info.value)
    assert FILE in str(info.value)


@pytest.mark.parametrize(
    "seed_type",
    [pa.int32(), pa.int64(), pa.uint64(), pa.float64(), pa.null(), pa.decimal128(20, 0)],
)
def test_seed_column_of_numeric_type_passes(seed_type):
    check_schema(schema(prompt=pa.string(), seed=seed_type), input_spec(seed_column="seed"), FILE)


def test_missing_seed_column_is_refused():
    with pytest.raises(InputError, match="seed column 'row_seed' is missing"):
        check_schema(schema(prompt=pa.string()), input_spec(seed_column="row_seed"), FILE)


def test_id_column_of_float_type_is_refused():
    with pytest.raises(InputError, match="id column 'id'"):
        check_schema(schema(prompt=pa.string(), id=pa.float64()), input_spec(id_column="id"), FILE)


def test_negative_prompt_column_must_be_text():
    spec = input_spec(negative_prompt_column="neg")
    with pytest.raises(InputError, match="negative prompt column 'neg'"):
        check_schema(schema(prompt=pa.string(), neg=pa.int64()), spec, FILE)


def test_missing_passthrough_column_is_refused():
    spec = input_spec(passthrough_columns=["category", "license"])
    with pytest.raises(InputError) as info:
        check_schema(schema(prompt=pa.string(), category=pa.string()), spec, FILE)
    assert "passthrough column 'license' is missing" in str(info.value)
    assert FILE in str(info.value)


@pytest.mark.parametrize("column", sorted(RESERVED_COLUMNS))
def test_passthrough_column_clashing_with_any_column_koala_batch_adds_is_refused(column):
    # Refused with the spec, before any file is read: source, row_index, ordinal and
    # prompt_truncated included, which once slipped through to fail inside Ray.
    with pytest.raises(SpecError) as info:
        input_spec(passthrough_columns=[column])
    assert "input.passthrough_columns" in str(info.value)
    assert repr(column) in str(info.value)


@pytest.mark.parametrize(
    "role", ["prompt_column", "id_column", "seed_column", "negative_prompt_column"]
)
@pytest.mark.parametrize("column", ["source", "row_index", "row_ordinal"])
def test_input_column_named_like_a_provenance_column_is_refused(role, column):
    with pytest.raises(SpecError) as info:
        input_spec(**{role: column})
    assert f"input.{role}" in str(info.value) and repr(column) in str(info.value)


# ---------------------------------------------------------------------------------------
# the output inside the input (issue 8, case 1)


def with_manifest(directory):
    """A directory holding an input table and, under out/, a job's manifest: a Parquet
    file with a prompt column, which a listing of the directory would take as input."""
    write(directory / "in.parquet", ["a cat", "a dog"])
    write(directory / "out" / "manifests" / "000000000000-0123abcd.parquet", ["a cat"])
    return directory


@pytest.mark.parametrize(
    ("input_uri", "output_uri", "how"),
    [
        ("{d}", "{d}/out", "can reach"),
        ("{d}/", "{d}/out/", "can reach"),
        ("{d}/sub/..", "{d}/out", "can reach"),
        ("{d}/**/*.parquet", "{d}/out", "can reach"),
        ("{d}/*/*/*.parquet", "{d}/out", "can reach"),
        ("{d}/out/manifests", "{d}/out", "lies inside"),
        ("{d}/out/manifests/*.parquet", "{d}/out", "lies inside"),
        ("{d}", "{d}", "lies inside"),
    ],
)
def test_input_that_can_reach_the_output_is_refused_naming_both(
    tmp_path, input_uri, output_uri, how
):
    directory = with_manifest(tmp_path)
    (directory / "sub").mkdir()
    input_uri, output_uri = (uri.format(d=directory) for uri in (input_uri, output_uri))
    with pytest.raises(SpecError) as info:
        plan_input(InputSpec(uri=input_uri), output_uri=output_uri)
    message = str(info.value)
    assert f"input.uri {input_uri} {how} output.uri {output_uri}:" in message
    assert "write the output outside the input" in message
    assert "\n" not in message


def test_relative_input_and_output_are_compared_as_absolute(tmp_path, monkeypatch):
    with_manifest(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match="input.uri . can reach output.uri out"):
        plan_input(InputSpec(uri="."), output_uri="out")


def test_refused_with_an_id_column_too_before_any_id_is_read(tmp_path):
    # Once the manifests were listed as input, the rerun failed on duplicate ids
    # pointing into out/manifests/; now the overlap itself is the message.
    pq.write_table(pa.table({"prompt": ["a"], "id": ["x"]}), tmp_path / "in.parquet")
    (tmp_path / "out").mkdir()
    pq.write_table(pa.table({"prompt": ["a"], "id": ["x"]}), tmp_path / "out" / "m.parquet")
    with pytest.raises(SpecError, match="can reach output.uri"):
        plan_input(InputSpec(uri=str(tmp_path), id_column="id"), output_uri=str(tmp_path / "out"))


@pytest.mark.parametrize(
    "input_uri",
    ["{d}/*.parquet", "{d}/in.parquet", "{d}/o*", "{d}/s*/x/*.parquet", "{d}/sub"],
)
def test_input_that_cannot_reach_the_output_is_planned(tmp_path, input_uri):
    directory = with_manifest(tmp_path)
    write(directory / "sub" / "s.parquet", ["a fox"])
    input_uri = input_uri.format(d=directory)
    if "o*" in input_uri:
        write(directory / "other.parquet", ["an owl"])
    if "/x/" in input_uri:
        write(directory / "sub" / "x" / "t.parquet", ["a toad"])
    plan = plan_input(InputSpec(uri=input_uri), output_uri=str(directory / "out"))
    assert not any("manifests" in f.url for f in plan.files)


def test_output_elsewhere_or_on_another_store_is_not_an_overlap(tmp_path):
    write(tmp_path / "in" / "a.parquet", ["a cat"])
    for output in (tmp_path / "in-out", tmp_path / "out", f"s3://bucket{tmp_path}/in/out"):
        assert plan_input(InputSpec(uri=str(tmp_path / "in")), output_uri=str(output)).num_rows


def test_a_file_of_the_output_reached_through_a_symlink_is_refused(tmp_path):
    directory = with_manifest(tmp_path)
    manifest = directory / "out" / "manifests" / "000000000000-0123abcd.parquet"
    (directory / "inputs").mkdir()
    (directory / "inputs" / "linked.parquet").symlink_to(manifest)
    with pytest.raises(SpecError, match=r"lists .*linked\.parquet, which is inside output\.uri"):
        plan_input(InputSpec(uri=str(directory / "inputs")), output_uri=str(directory / "out"))


# ---------------------------------------------------------------------------------------
# damaged files and text that is not UTF-8 (issue 8, case 5)

PROMPTS = [f"prompt number {i}, " * 5 for i in range(2000)]


def damage_row_group(path, group: int, where: str = "middle") -> None:
    """Overwrite bytes in the middle (or the first page header) of a row group's prompt
    data; the footer stays whole."""
    chunk = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    offset = start + chunk.total_compressed_size // 2 if where == "middle" else start
    data = bytearray(path.read_bytes())
    data[offset : offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("compression", "where"), [("snappy", "middle"), ("zstd", "middle"), ("none", "header")]
)
def test_damaged_row_group_fails_at_once_naming_file_and_rows(tmp_path, caplog, compression, where):
    path = tmp_path / "in" / "part-0.parquet"
    path.parent.mkdir()
    pq.write_table(
        pa.table({"prompt": PROMPTS}), path, row_group_size=1000, compression=compression
    )
    damage_row_group(path, 1, where)
    spec = InputSpec(uri=str(tmp_path / "in"))
    units = plan_input(spec).read_units()  # the footer is intact: planning passes
    reader = ReadRowGroups(spec)
    assert reader.read_unit(units[0]).num_rows == 1000

    with caplog.at_level("WARNING"), pytest.raises(InputError) as info:
        reader.read_unit(units[1])
    message = str(info.value)
    assert message.startswith(
        f"input file {path}: row group 1 (rows 1000 to 1999) is unreadable: OSError: "
    )
    assert message.endswith("the file is damaged: rewrite it, or take it out of the input")
    assert "\n" not in message
    assert not [r for r in caplog.records if "retry" in r.getMessage()]  # not retried


class FlakyReads(LocalFileSystem):
    """The local disk, whose open files fail their first `failures` reads as a dropped
    connection does."""

    cachable = False

    def __init__(self, failures: int):
        super().__init__()
        self.failures = failures

    def open(self, path, mode="rb", **kwargs):
        return FlakyHandle(super().open(path, mode, **kwargs), self)


class FlakyHandle:
    def __init__(self, handle, fs: FlakyReads):
        self.handle, self.fs = handle, fs

    def read(self, *args):
        if self.fs.failures:
            self.fs.failures -= 1
            raise ConnectionResetError("connection reset by peer")
        return self.handle.read(*args)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.close()


def test_a_storage_fault_while_reading_a_row_group_is_still_retried(tree, caplog):
    spec = InputSpec(uri=str(tree))
    units = plan_input(spec).read_units()
    fs = FlakyReads(failures=1)
    with caplog.at_level("WARNING"):
        table = ReadRowGroups(spec, fs).read_unit(units[2])
    assert table.column("prompt").to_pylist() == ["b2"]
    assert fs.failures == 0
    assert [r for r in caplog.records if "ConnectionResetError" in r.getMessage()]


def test_a_damaged_footer_is_not_retried(tmp_path, caplog):
    path = tmp_path / "in.parquet"
    write(path, ["a cat"])
    data = bytearray(path.read_bytes())
    data[-40:-8] = b"\xff" * 32  # inside the footer's metadata; the magic bytes stay
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING"), pytest.raises(InputError) as info:
        plan_input(InputSpec(uri=str(path)))
    assert str(info.value).startswith(f"input file {path} is not a readable Parquet file: ")
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


def binary_as_string(values: list[bytes | None]) -> pa.Array:
    return pa.array(values, pa.binary()).view(pa.string())


def test_id_that_is_not_utf8_is_refused_naming_file_and_row(tmp_path):
    path = tmp_path / "in.parquet"
    ids = binary_as_string([b"one", b"two", b"caf\xe9", b"\xff"])
    pq.write_table(pa.table({"prompt": ["a", "b", "c", "d"], "id": ids}), path)
    with pytest.raises(InputError) as info:
        plan_input(InputSpec(uri=str(path), id_column="id"))
    assert str(info.value) == (
        f"input file {path}: id column 'id' row 2: byte 0xe9 at offset 3 is not valid UTF-8 "
        "(2 such row(s) in this file); ids must be text: rewrite the file with valid UTF-8 ids"
    )


def test_text_values_escapes_bad_bytes_and_names_them():
    column = pa.chunked_array(
        [binary_as_string([b"ok", None]), binary_as_string([b"\xe2\x82", b"\xf0\x9f\xa6\x8a"])]
    )
    values, bad = text_values(column)
    assert values == ["ok", None, "\\xe2\\x82", "🦊"]
    assert bad == {2: "byte 0xe2 at offset 0 is not valid UTF-8"}
    assert text_values(pa.chunked_array([pa.array([1, None])])) == ([1, None], {})
