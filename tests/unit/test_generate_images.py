"""The pure parts of `generate_images`: its spec, a Dataset's rows, the rows it yields."""

from __future__ import annotations

import pyarrow as pa
import pytest
import yaml

from koala_batch.errors import InputError, SpecError
from koala_batch.keys import image_seed, sample_key
from koala_batch.runtime.graph import UNUSED_URIS, generation_spec
from koala_batch.schemas import IMAGE_ROW_SCHEMA, MANIFEST_COLUMNS, STATUS_OK, Col
from koala_batch.spec import JobSpec
from koala_batch.stages.expand import ExpandImages
from koala_batch.stages.generate import image_rows
from koala_batch.stages.read import DatasetRows
from tests.unit.conftest import make_spec

SECTIONS = {
    "input": {"id_column": "id", "seed_column": "seed", "passthrough_columns": ["tag"]},
    "model": {"name": "tiny"},
    "generation": {"width": 64, "height": 64, "steps": 2, "seed": 7, "images_per_prompt": 2},
}


def test_a_dict_or_file_spec_may_leave_out_both_uris(tmp_path):
    spec = generation_spec(SECTIONS)
    assert isinstance(spec, JobSpec)
    assert spec.input.id_column == "id" and spec.generation.images_per_prompt == 2
    assert f"input.uri={spec.input.uri}" in UNUSED_URIS
    assert f"output.uri={spec.output.uri}" in UNUSED_URIS
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SECTIONS))
    assert generation_spec(path) == spec
    given = make_spec("out", input={"id_column": "id"})
    assert generation_spec(given) is given


def test_the_spec_stays_strict():
    with pytest.raises(SpecError, match="generation.stepz: unknown field"):
        generation_spec({**SECTIONS, "generation": {"stepz": 2}})


def prompt_rows(**columns) -> pa.Table:
    values = {
        "id": ["cat", "dog", "owl"],
        "prompt": ["a cat", "a dog", "  "],
        "seed": [None, 100, None],
        "tag": ["x", "y", "z"],
    }
    values.update(columns)
    return pa.table(values)


def test_a_datasets_rows_get_keys_and_seeds_a_job_gives_the_same_ids():
    spec = generation_spec(SECTIONS)
    rows = DatasetRows(spec.input)(prompt_rows(id=["cat", "dog", "7"]))
    assert rows.column(Col.SOURCE).null_count == rows.num_rows
    work = ExpandImages(spec)(rows)
    ids = work.column(Col.ID).to_pylist()
    assert ids == ["cat", "cat", "dog", "dog", "7", "7"]
    indices = work.column(Col.IMAGE_INDEX).to_pylist()
    seeds = [None, None, 100, 100, None, None]
    assert work.column(Col.KEY).to_pylist() == [
        sample_key(i, k) for i, k in zip(ids, indices, strict=True)
    ]
    assert work.column(Col.SEED).to_pylist() == [
        image_seed(s, 7, i, k) for s, i, k in zip(seeds, ids, indices, strict=True)
    ]
    assert work.column(Col.STATUS).to_pylist()[-1] == "error"  # the blank prompt
    assert work.column("tag").to_pylist() == ["x", "x", "y", "y", "z", "z"]


def test_rows_that_have_the_read_stages_provenance_pass_unchanged():
    spec = generation_spec(SECTIONS)
    table = prompt_rows(id=["a", "b", "c"]).append_column(Col.SOURCE, pa.array(["f"] * 3))
    table = table.append_column(Col.ROW_INDEX, pa.array([0, 1, 2], pa.int64()))
    table = table.append_column(Col.ROW_ORDINAL, pa.array([5, 6, 7], pa.int64()))
    assert DatasetRows(spec.input)(table) is table


def test_a_dataset_without_the_id_column_is_refused_naming_input_id_column():
    spec = generation_spec(SECTIONS)
    with pytest.raises(InputError) as info:
        DatasetRows(spec.input)(prompt_rows().drop_columns(["id"]))
    assert "'id' (input.id_column) is missing" in str(info.value)
    assert "prompt (string)" in str(info.value)
    without = generation_spec({**SECTIONS, "input": {"seed_column": "seed"}})
    with pytest.raises(SpecError, match="input.id_column is not set"):
        DatasetRows(without.input)(prompt_rows())


def test_a_null_id_in_a_dataset_is_refused_naming_the_row():
    spec = generation_spec(SECTIONS)
    with pytest.raises(InputError, match=r"null in 1 row.*'a dog'"):
        DatasetRows(spec.input)(prompt_rows(id=["cat", None, "owl"]))


def test_other_columns_are_checked_as_a_files_are():
    spec = generation_spec(SECTIONS)
    with pytest.raises(InputError, match="passthrough column 'tag' is missing"):
        DatasetRows(spec.input)(prompt_rows(id=["a", "b", "c"]).drop_columns(["tag"]))


def generated(spec, sources) -> pa.Table:
    """What the generator hands on: work rows with images (as its unit tests fake them)."""
    rows = prompt_rows(id=["a", "b", "c"])
    if sources is not None:
        rows = rows.append_column(Col.SOURCE, pa.array(sources, pa.string()))
        rows = rows.append_column(Col.ROW_INDEX, pa.array([0, 1, 2], pa.int64()))
        rows = rows.append_column(Col.ROW_ORDINAL, pa.array([0, 1, 2], pa.int64()))
    work = ExpandImages(spec)(DatasetRows(spec.input)(rows))
    count = work.num_rows
    extra = {
        Col.PROMPT_TRUNCATED: pa.array([False] * count),
        Col.IMAGE: pa.array([b"png"] * count, pa.binary()),
        Col.SHA256: pa.array(["0" * 64] * count),
        Col.BYTES: pa.array([3] * count, pa.int64()),
        Col.GENERATED_AT: pa.array([1.5] * count),
    }
    for name in IMAGE_ROW_SCHEMA.names:
        if name not in work.column_names and name not in spec.spec_constants():
            work = work.append_column(name, extra.get(name, pa.nulls(count, pa.float64())))
    return work


def test_image_rows_have_the_schema_defined_once_then_the_passthrough_columns():
    spec = generation_spec(SECTIONS)
    rows = image_rows(generated(spec, None), spec.spec_constants(), ["tag"])
    assert rows.schema == IMAGE_ROW_SCHEMA.append(pa.field("tag", pa.string()))
    # every manifest column but the writer's, and the image
    assert set(MANIFEST_COLUMNS) - set(rows.column_names) == {Col.SHARD, Col.MEMBER}
    assert Col.IMAGE in rows.column_names
    assert rows.column(Col.MODEL).to_pylist() == ["tiny"] * 6
    assert rows.column(Col.IMAGE_FORMAT).to_pylist() == ["png"] * 6
    # a Dataset's rows have no position
    for column in (Col.SOURCE, Col.ROW_INDEX, Col.ORDINAL):
        assert rows.column(column).null_count == 6
    assert rows.column(Col.STATUS).to_pylist()[:4] == [STATUS_OK] * 4


def test_rows_read_from_files_keep_their_ordinals():
    spec = generation_spec(SECTIONS)
    rows = image_rows(generated(spec, ["f", "f", "g"]), spec.spec_constants(), ["tag"])
    assert rows.column(Col.ORDINAL).to_pylist() == [0, 1, 2, 3, 4, 5]
    assert rows.column(Col.SOURCE).to_pylist() == ["f", "f", "f", "f", "g", "g"]
