"""Validation: row checks that become error rows, and one work row per image.

Schema problems were refused while planning the input (`read.check_schema`). A row
problem (empty prompt, unusable seed, null id, text that is not valid UTF-8) makes that
row's images manifest rows with status=error and the reason; nothing is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from koala_batch.config import JobSpec
from koala_batch.keys import SEED_MODULUS, KeySet, derived_row_id, image_seed, sample_key
from koala_batch.read import text_values
from koala_batch.schemas import (
    READ_COLUMNS,
    STATUS_ERROR,
    STATUS_OK,
    WORK_FIELDS,
    Col,
    require_columns,
)


def check_prompt(prompt: Any) -> str | None:
    """Why a prompt cannot be used, or None if it can."""
    if prompt is None:
        return "prompt is null"
    if not prompt.strip():
        return "prompt is empty or whitespace only"
    return None


def parse_row_seed(value: Any) -> tuple[int | None, str | None]:
    """(seed, None) for a usable seed value, (None, reason) for a bad one, (None, None) for null."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, None
    if isinstance(value, bool):
        return None, f"seed {value!r} is not an integer"
    try:
        as_int = int(value)
    except (TypeError, ValueError, OverflowError):
        return None, f"seed {value!r} is not an integer"
    if not isinstance(value, int) and value != as_int:
        return None, f"seed {value!r} is not a whole number"
    if as_int < 0:
        return None, f"seed {as_int} is negative; seeds are 0 to 2**64-1"
    if as_int >= SEED_MODULUS:
        return None, f"seed {as_int} does not fit in 64 bits; seeds are 0 to 2**64-1"
    return as_int, None


def _column_values(table: pa.Table, column: str | None) -> list[Any]:
    if column is None:
        return [None] * table.num_rows
    return table.column(column).to_pylist()


def _text_column(
    table: pa.Table, column: str | None, role: str, problems: dict[int, list[str]]
) -> tuple[list[Any], set[int]]:
    """A text column's values and the rows whose value is not valid UTF-8: each of those
    adds a problem to its row, and its value comes back with the bad bytes escaped."""
    if column is None:
        return [None] * table.num_rows, set()
    values, bad = text_values(table.column(column))
    for row, why in bad.items():
        problems.setdefault(row, []).append(f"{role} column {column!r}: {why}")
    return values, set(bad)


def _passthrough_column(
    table: pa.Table, column: str, problems: dict[int, list[str]]
) -> pa.ChunkedArray:
    """A passthrough column as it is, unless it holds text that is not valid UTF-8: then
    with those values escaped (the manifest and sidecars must stay readable) and a
    problem on their rows."""
    values = table.column(column)
    value_type = values.type.value_type if pa.types.is_dictionary(values.type) else values.type
    if value_type not in (pa.string(), pa.large_string(), pa.string_view()):
        return values
    try:
        values.validate(full=True)  # checks UTF-8 in C++, far cheaper than decoding
        return values
    except pa.ArrowInvalid:
        pass
    decoded, _ = _text_column(table, column, "passthrough", problems)
    return pa.chunked_array([pa.array(decoded, value_type).cast(values.type)])


class ExpandImages:
    """Validate stage: input rows in, one work row per (row, image index) out.

    Each work row carries its id, key, seed and ordinal, plus status/error when the row
    cannot be generated. Rows whose key is already committed are left out (resume).
    """

    def __init__(self, spec: JobSpec, committed_keys: KeySet | Iterable[str] | None = None):
        self.input = spec.input
        self.images_per_prompt = spec.generation.images_per_prompt
        self.job_seed = spec.generation.seed
        self.default_negative = spec.generation.negative_prompt
        if committed_keys is None:
            committed_keys = KeySet()
        elif not isinstance(committed_keys, KeySet):
            committed_keys = KeySet.from_keys(committed_keys)
        self.committed_keys = committed_keys

    def __call__(self, table: pa.Table) -> pa.Table:
        spec = self.input
        role_columns = [
            spec.prompt_column,
            spec.id_column,
            spec.negative_prompt_column,
            spec.seed_column,
            *spec.passthrough_columns,
        ]
        require_columns(table, [*READ_COLUMNS, *(c for c in role_columns if c)], "validate")
        sources = table.column(Col.SOURCE).to_pylist()
        row_indices = table.column(Col.ROW_INDEX).to_pylist()
        row_ordinals = table.column(Col.ROW_ORDINAL).to_pylist()
        # Row problems found column-wise: text that is not valid UTF-8.
        column_problems: dict[int, list[str]] = {}
        prompts, _ = _text_column(table, spec.prompt_column, "prompt", column_problems)
        raw_ids, bad_ids = _text_column(table, spec.id_column, "id", column_problems)
        negatives, _ = _text_column(
            table, spec.negative_prompt_column, "negative prompt", column_problems
        )
        seeds = _column_values(table, spec.seed_column)
        passthrough = {
            column: _passthrough_column(table, column, column_problems)
            for column in spec.passthrough_columns
        }

        out: dict[str, list[Any]] = {field.name: [] for field in WORK_FIELDS}
        take: list[int] = []
        for row in range(table.num_rows):
            problems = column_problems.get(row, [])
            if spec.id_column is None:
                row_id = derived_row_id(sources[row], row_indices[row])
            elif raw_ids[row] is None:
                row_id = derived_row_id(sources[row], row_indices[row])
                problems.append(f"id column {spec.id_column!r} is null")
            elif row in bad_ids:
                # Planning refuses such ids; an id must never be its escaped bytes.
                row_id = derived_row_id(sources[row], row_indices[row])
            else:
                row_id = str(raw_ids[row])
            prompt_problem = check_prompt(prompts[row])
            if prompt_problem:
                problems.append(prompt_problem)
            row_seed, seed_problem = parse_row_seed(seeds[row])
            if seed_problem:
                problems.append(seed_problem)
            negative = negatives[row] if negatives[row] is not None else self.default_negative
            for image_index in range(self.images_per_prompt):
                take.append(row)
                out[Col.ID].append(row_id)
                out[Col.IMAGE_INDEX].append(image_index)
                out[Col.KEY].append(sample_key(row_id, image_index))
                out[Col.SEED].append(image_seed(row_seed, self.job_seed, row_id, image_index))
                out[Col.ORDINAL].append(row_ordinals[row] * self.images_per_prompt + image_index)
                out[Col.PROMPT].append(prompts[row])
                out[Col.NEGATIVE_PROMPT].append(negative)
                out[Col.SOURCE].append(sources[row])
                out[Col.ROW_INDEX].append(row_indices[row])
                out[Col.STATUS].append(STATUS_ERROR if problems else STATUS_OK)
                out[Col.ERROR].append("; ".join(problems) if problems else None)

        columns = {field.name: pa.array(out[field.name], field.type) for field in WORK_FIELDS}
        indices = pa.array(take, pa.int64())
        for column in spec.passthrough_columns:
            columns[column] = passthrough[column].take(indices)
        work = pa.table(columns)
        committed = self.committed_keys.contains_many(out[Col.KEY])
        return work.filter(pa.array(~committed)) if committed.any() else work
