"""Validation: schema checks that fail the job early, row checks that become error rows.

A schema problem (missing or mistyped column) fails the whole job before any model
loads, naming the file and column. A row problem (empty prompt, unusable seed) makes
that row's images manifest rows with status=error and the reason; nothing is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from koala_batch.config import InputSpec, JobSpec
from koala_batch.keys import SEED_MODULUS, KeySet, derived_row_id, image_seed, sample_key
from koala_batch.read import InputError

STATUS_OK = "ok"
STATUS_ERROR = "error"

# Columns koala-batch adds on the way to the manifest; passthrough columns may not reuse them.
INTERNAL_COLUMNS = frozenset(
    {"source", "row_index", "row_ordinal", "ordinal", "pixels", "image", "prompt_truncated"}
)


def _value_type(dtype: pa.DataType) -> pa.DataType:
    """The logical type: pandas categoricals arrive as dictionary-encoded columns."""
    return dtype.value_type if pa.types.is_dictionary(dtype) else dtype


def _is_text(dtype: pa.DataType) -> bool:
    dtype = _value_type(dtype)
    return (pa.types.is_string(dtype) or pa.types.is_large_string(dtype)
            or pa.types.is_string_view(dtype) or pa.types.is_null(dtype))


def _describe_columns(schema: pa.Schema) -> str:
    return ", ".join(f"{field.name} ({field.type})" for field in schema)


def check_schema(schema: pa.Schema, spec: InputSpec, file_url: str) -> None:
    """Raise InputError naming the file and column if this schema cannot serve the spec."""
    names = set(schema.names)

    def require(column: str, role: str) -> pa.DataType:
        if column not in names:
            raise InputError(
                f"input file {file_url}: {role} column {column!r} is missing; "
                f"columns present: {_describe_columns(schema)}"
            )
        return schema.field(column).type

    prompt_type = require(spec.prompt_column, "prompt")
    if not _is_text(prompt_type):
        raise InputError(
            f"input file {file_url}: prompt column {spec.prompt_column!r} has type "
            f"{prompt_type}, expected string"
        )
    if spec.negative_prompt_column:
        negative_type = require(spec.negative_prompt_column, "negative prompt")
        if not _is_text(negative_type):
            raise InputError(
                f"input file {file_url}: negative prompt column {spec.negative_prompt_column!r} "
                f"has type {negative_type}, expected string"
            )
    if spec.id_column:
        id_type = require(spec.id_column, "id")
        if not (_is_text(id_type) or pa.types.is_integer(_value_type(id_type))):
            raise InputError(
                f"input file {file_url}: id column {spec.id_column!r} has type {id_type}, "
                "expected string or integer"
            )
    if spec.seed_column:
        seed_type = _value_type(require(spec.seed_column, "seed"))
        if not (pa.types.is_integer(seed_type) or pa.types.is_floating(seed_type)
                or pa.types.is_null(seed_type) or pa.types.is_decimal(seed_type)):
            raise InputError(
                f"input file {file_url}: seed column {spec.seed_column!r} has type {seed_type}, "
                "expected integer"
            )
    for column in spec.passthrough_columns:
        require(column, "passthrough")
        if column in INTERNAL_COLUMNS:
            raise InputError(
                f"input file {file_url}: passthrough column {column!r} clashes with a column "
                "koala-batch adds; rename it"
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
        sources = table.column("source").to_pylist()
        row_indices = table.column("row_index").to_pylist()
        row_ordinals = table.column("row_ordinal").to_pylist()
        prompts = _column_values(table, spec.prompt_column)
        raw_ids = _column_values(table, spec.id_column)
        negatives = _column_values(table, spec.negative_prompt_column)
        seeds = _column_values(table, spec.seed_column)

        out: dict[str, list[Any]] = {name: [] for name in (
            "id", "image_index", "key", "seed", "ordinal", "prompt", "negative_prompt",
            "source", "row_index", "status", "error")}
        take: list[int] = []
        for row in range(table.num_rows):
            problems = []
            if spec.id_column is None:
                row_id = derived_row_id(sources[row], row_indices[row])
            elif raw_ids[row] is None:
                row_id = derived_row_id(sources[row], row_indices[row])
                problems.append(f"id column {spec.id_column!r} is null")
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
                out["id"].append(row_id)
                out["image_index"].append(image_index)
                out["key"].append(sample_key(row_id, image_index))
                out["seed"].append(image_seed(row_seed, self.job_seed, row_id, image_index))
                out["ordinal"].append(row_ordinals[row] * self.images_per_prompt + image_index)
                out["prompt"].append(prompts[row])
                out["negative_prompt"].append(negative)
                out["source"].append(sources[row])
                out["row_index"].append(row_indices[row])
                out["status"].append("error" if problems else STATUS_OK)
                out["error"].append("; ".join(problems) if problems else None)

        types = {"image_index": pa.int32(), "seed": pa.uint64(), "ordinal": pa.int64(),
                 "row_index": pa.int64()}
        columns = {name: pa.array(values, types.get(name, pa.string())) for name, values in out.items()}
        indices = pa.array(take, pa.int64())
        for column in spec.passthrough_columns:
            columns[column] = table.column(column).take(indices)
        work = pa.table(columns)
        committed = self.committed_keys.contains_many(out["key"])
        return work.filter(pa.array(~committed)) if committed.any() else work
