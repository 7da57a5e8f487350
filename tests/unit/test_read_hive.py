"""Hive-partitioned input: `key=value` directories below the input root are columns."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from koala_batch.errors import InputError
from koala_batch.inputs.files import plan_input
from koala_batch.spec import InputSpec
from koala_batch.stages.read import ReadRowGroups

# (path below the root, prompts): string and int keys, a URL escape, Hive's null.
TREE = {
    "date=2026-11-01/n=1/part-0.parquet": ["a0", "a1"],
    "date=2026-11-02/n=__HIVE_DEFAULT_PARTITION__/part-0.parquet": ["b0"],
    "date=caf%C3%A9%2Fbar/n=12/part-0.parquet": ["c0", "c1", "c2"],
}


def write_tree(root, tree=TREE, **extra_columns):
    for relative, prompts in tree.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = {name: values[: len(prompts)] for name, values in extra_columns.items()}
        pq.write_table(pa.table({"prompt": prompts, **columns}), path, row_group_size=2)
    return root


def read_all(spec: InputSpec) -> pa.Table:
    plan = plan_input(spec)
    reader = ReadRowGroups(spec)
    return pa.concat_tables([reader.read_unit(unit) for unit in plan.read_units()])


def test_partition_keys_are_columns_typed_and_valued_as_pyarrow_dataset_reads_them(tmp_path):
    root = write_tree(tmp_path / "in")
    spec = InputSpec(uri=str(root), passthrough_columns=["date", "n"])
    plan = plan_input(spec)
    for input_file in plan.files:
        assert input_file.schema.names == ["prompt", "date", "n"]
    rows = read_all(spec).sort_by("prompt")

    expected = pads.dataset(str(root), partitioning="hive").to_table().sort_by("prompt")
    assert rows.schema.field("date").type == expected.schema.field("date").type == pa.string()
    assert rows.schema.field("n").type == expected.schema.field("n").type == pa.int32()
    assert rows.column("date").to_pylist() == expected.column("date").to_pylist()
    assert rows.column("n").to_pylist() == expected.column("n").to_pylist()
    assert rows.column("date").to_pylist()[-3:] == ["café/bar"] * 3  # URL escapes decoded
    assert rows.column("n").to_pylist()[2] is None  # __HIVE_DEFAULT_PARTITION__


def test_partition_keys_serve_as_id_seed_and_passthrough_columns(tmp_path):
    root = tmp_path / "in"
    for shard in ("x", "y"):
        path = root / f"s=5/region=eu/ident={shard}/part.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(pa.table({"prompt": [f"p-{shard}"]}), path)
    spec = InputSpec(
        uri=str(root), id_column="ident", seed_column="s", passthrough_columns=["region"]
    )
    rows = read_all(spec)
    assert rows.column("ident").to_pylist() == ["x", "y"]
    assert rows.column("s").to_pylist() == [5, 5]
    assert rows.column("region").to_pylist() == ["eu", "eu"]
    # provenance (and so a derived id) is the path below the root, as without partitions
    assert rows.column("source").to_pylist() == [
        "s=5/region=eu/ident=x/part.parquet",
        "s=5/region=eu/ident=y/part.parquet",
    ]


def test_a_partition_id_shared_by_rows_of_a_file_is_a_duplicate_id(tmp_path):
    root = write_tree(tmp_path / "in", {"ident=one/part.parquet": ["a", "b"]})
    with pytest.raises(InputError, match="duplicate id.*'one'"):
        plan_input(InputSpec(uri=str(root), id_column="ident"))


def test_planning_checks_partition_columns_as_it_does_file_columns(tmp_path):
    root = write_tree(tmp_path / "in")
    with pytest.raises(InputError) as info:
        plan_input(InputSpec(uri=str(root), seed_column="date"))
    assert "seed column 'date' has type string" in str(info.value)
    with pytest.raises(InputError) as info:
        plan_input(InputSpec(uri=str(root), passthrough_columns=["lang"]))
    assert "'lang' is missing" in str(info.value)
    assert "date (string), n (int32)" in str(info.value)


def test_an_images_per_prompt_partition_counts_the_planned_images(tmp_path):
    root = write_tree(tmp_path / "in", {"k=2/part.parquet": ["a", "b"], "k=3/part.parquet": ["c"]})
    plan = plan_input(InputSpec(uri=str(root), images_per_prompt_column="k"))
    assert plan.planned_images == 2 * 2 + 3


def test_partitions_count_only_below_the_input_root(tmp_path):
    root = write_tree(tmp_path / "in")
    single = root / "date=2026-11-01/n=1/part-0.parquet"
    (only,) = plan_input(InputSpec(uri=str(single))).files
    assert only.partitions == () and only.schema.names == ["prompt"]
    below_glob = plan_input(InputSpec(uri=str(root / "date=2026-11-01/*/*.parquet"))).files
    assert [f.partitions for f in below_glob] == [(("n", 1),)]


def test_unpartitioned_input_reads_as_before(tmp_path):
    root = write_tree(tmp_path / "in", {"a.parquet": ["a"], "nested/b.parquet": ["b"]})
    spec = InputSpec(uri=str(root))
    plan = plan_input(spec)
    assert [unit["partitions"] for unit in plan.read_units()] == [None, None]
    rows = read_all(spec)
    assert rows.column_names == ["source", "row_index", "row_ordinal", "prompt"]
    assert rows.column("source").to_pylist() == ["a.parquet", "nested/b.parquet"]


def test_a_partition_key_that_is_also_a_file_column_is_refused_naming_file_and_key(tmp_path):
    root = write_tree(tmp_path / "in", {"date=1/part.parquet": ["a"]}, date=["1"])
    with pytest.raises(InputError) as info:
        plan_input(InputSpec(uri=str(root)))
    assert "date=1/part.parquet" in str(info.value)
    assert "partition key 'date'" in str(info.value)


@pytest.mark.parametrize(
    ("tree", "key"),
    [
        ({"date=1/a.parquet": ["a"], "b.parquet": ["b"]}, "date"),
        ({"date=1/a.parquet": ["a"], "lang=en/b.parquet": ["b"]}, "lang"),
        ({"a=1/b=2/x.parquet": ["a"], "b=2/a=1/y.parquet": ["b"]}, "b"),
    ],
)
def test_files_under_different_partition_keys_are_refused_naming_file_and_key(tmp_path, tree, key):
    root = write_tree(tmp_path / "in", tree)
    with pytest.raises(InputError) as info:
        plan_input(InputSpec(uri=str(root)))
    message = str(info.value)
    assert f"partition key {key!r}" in message
    assert list(tree)[1] in message  # the second file, the one that differs


def test_a_key_repeated_in_one_path_is_refused(tmp_path):
    root = write_tree(tmp_path / "in", {"n=1/n=2/x.parquet": ["a"]})
    with pytest.raises(InputError, match="partition key 'n' appears twice"):
        plan_input(InputSpec(uri=str(root)))


def test_a_key_null_in_every_file_is_refused_naming_it(tmp_path):
    tree = {
        "a=__HIVE_DEFAULT_PARTITION__/b=__HIVE_DEFAULT_PARTITION__/x.parquet": ["x"],
        "a=1/b=__HIVE_DEFAULT_PARTITION__/y.parquet": ["y"],
    }
    root = write_tree(tmp_path / "in", tree)
    with pytest.raises(InputError, match="partition key 'b' is __HIVE_DEFAULT_PARTITION__"):
        plan_input(InputSpec(uri=str(root)))
