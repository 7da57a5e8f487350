"""Input listing and planning: files, prefixes, globs, lists; row groups; derived ids."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from koala_batch.config import InputSpec
from koala_batch.read import InputError, ReadRowGroups, plan_input


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
    assert [(u["source"], u["row_group"], u["row_offset"], u["ordinal_offset"], u["num_rows"])
            for u in units] == [
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
