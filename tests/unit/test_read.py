"""Input listing and planning: files, prefixes, globs, lists; row groups; derived ids."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from koala_batch.config import InputSpec
from koala_batch.errors import InputError, SpecError
from koala_batch.read import ReadRowGroups, check_schema, plan_input
from koala_batch.schemas import RESERVED_COLUMNS
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
