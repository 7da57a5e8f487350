"""Read stage: read units in, the rows of their row groups out; and rows of a
`ray.data.Dataset` given as the input."""

from __future__ import annotations

import pyarrow as pa

from koala_batch.errors import InputError, SpecError
from koala_batch.inputs.files import (
    DATASET_INPUT,
    READ_UNIT_FIELDS,
    RowGroupReader,
    check_schema,
    describe_columns,
    is_text,
    text_values,
)
from koala_batch.schemas import READ_COLUMNS, Col, require_columns
from koala_batch.spec import InputSpec


class ReadRowGroups(RowGroupReader):
    """Read stage: a batch of read units in, the rows of their row groups out."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, READ_UNIT_FIELDS, "read")
        return pa.concat_tables([self.read_unit(unit) for unit in batch.to_pylist()])


def check_dataset_schema(schema: pa.Schema, spec: InputSpec) -> None:
    """Raise SpecError or InputError, naming the column, if rows of this schema (those of
    a ray.data.Dataset) cannot serve the spec: as a file's (`check_schema`), and they
    need an id column, having no file and row index to derive ids from."""
    if spec.id_column is None:
        raise SpecError(
            "input.id_column is not set: rows of a ray.data.Dataset have no file and row "
            "index to derive ids from, and the id names and seeds each image; set "
            "input.id_column to a column of unique ids"
        )
    if spec.id_column not in schema.names:
        raise InputError(
            f"{DATASET_INPUT}: id column {spec.id_column!r} (input.id_column) is missing; rows "
            "of a ray.data.Dataset need one (they have no file and row index to derive ids "
            f"from); columns present: {describe_columns(schema)}"
        )
    check_schema(schema, spec, DATASET_INPUT)


class DatasetRows:
    """Read stage of a ray.data.Dataset of prompt rows: its rows in, with the provenance
    columns the validate stage takes (rows that have them, the read stage's, pass as
    they are).

    A Dataset's rows have no file or position: `source` and `row_index` are null, and a
    row's id comes only from input.id_column; a null id is an InputError (nothing to
    name or seed its images by). Ids must be unique, as in a file; a Dataset is not read
    twice to check it.
    """

    def __init__(self, spec: InputSpec):
        self.spec = spec

    def __call__(self, table: pa.Table) -> pa.Table:
        if all(column in table.column_names for column in READ_COLUMNS):
            return table
        check_dataset_schema(table.schema, self.spec)
        id_column = self.spec.id_column
        assert id_column is not None  # checked just above
        ids = table.column(id_column)
        if ids.null_count:
            nulls = table.filter(ids.is_null())
            prompt = nulls.column(self.spec.prompt_column)[0].as_py()
            raise InputError(
                f"{DATASET_INPUT}: id column {id_column!r} (input.id_column) is null in "
                f"{ids.null_count} row(s) of a batch, e.g. the row with prompt {prompt!r}; "
                "every row needs an id to name and seed its images: drop or fill those rows "
                "first"
            )
        _, bad = text_values(ids) if is_text(ids.type) else ([], {})
        if bad:
            row, why = next(iter(bad.items()))
            raise InputError(
                f"{DATASET_INPUT}: id column {id_column!r} (input.id_column), row {row} of a "
                f"batch: {why}; ids must be text: fix or drop those rows first"
            )
        count = table.num_rows
        table = table.drop_columns([c for c in READ_COLUMNS if c in table.column_names])
        provenance = {
            Col.SOURCE: pa.nulls(count, pa.string()),
            Col.ROW_INDEX: pa.nulls(count, pa.int64()),
            # The validate stage numbers images from it; a Dataset row has no position,
            # and generate_images nulls the ordinal it gets.
            Col.ROW_ORDINAL: pa.array([0] * count, pa.int64()),
        }
        for name, values in provenance.items():
            table = table.append_column(name, values)
        return table
