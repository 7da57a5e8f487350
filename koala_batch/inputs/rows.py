"""The input's rows: row checks that become error rows, one work row per image, and the
keys the input plans.

Schema problems were refused while planning the input (`read.check_schema`). A row
problem (empty prompt, unusable seed or generation parameter, null id, text that is not
valid UTF-8, a passthrough value no reader takes) makes that row's images manifest rows
with status=error and the reason, naming the column; nothing is dropped.

Each row carries the generation parameters of its pipeline call (steps, guidance scale,
width, height): its own from the columns the spec names, else the spec's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from koala_batch.inputs.files import InputPlan, RowGroupReader, images_of_row, text_values
from koala_batch.keys import (
    SEED_MODULUS,
    KeySet,
    derived_row_id,
    image_seed,
    key_digest,
    made_from_bytes,
    made_from_digest,
    sample_key,
)
from koala_batch.schemas import (
    READ_COLUMNS,
    STATUS_ERROR,
    STATUS_OK,
    WORK_FIELDS,
    Col,
    require_columns,
)
from koala_batch.spec import (
    GUIDANCE_SCALE_RULE,
    IMAGES_PER_PROMPT_RULE,
    SIDE_RULE,
    STEPS_RULE,
    JobSpec,
)
from koala_batch.storage import bounded_map


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
    if not 0 <= as_int < SEED_MODULUS:
        return None, f"seed {as_int} is outside 0 to 2**63-1"
    return as_int, None


def parse_row_steps(value: Any) -> tuple[int | None, str | None]:
    """(steps, None) for a usable value, (None, reason) for a bad one, (None, None) for null."""
    return STEPS_RULE.parse(value)


def parse_row_guidance_scale(value: Any) -> tuple[float | None, str | None]:
    """(guidance scale, None), (None, reason) for a bad value, (None, None) for null."""
    scale, problem = GUIDANCE_SCALE_RULE.parse(value)
    return (None if scale is None else float(scale)), problem


def parse_row_side(value: Any) -> tuple[int | None, str | None]:
    """A width or height: (pixels, None), (None, reason) for a bad value, (None, None) for
    null."""
    return SIDE_RULE.parse(value)


def parse_row_images_per_prompt(value: Any) -> tuple[int | None, str | None]:
    """(images, None), (None, reason) for a bad value, (None, None) for null. Planning
    counts a row's images with the same rule (`read.images_of_row`)."""
    return IMAGES_PER_PROMPT_RULE.parse(value)


# The parameter columns of a row: (InputSpec field, work column, rule), in message order.
_PARAMETERS = (
    ("steps_column", Col.STEPS, parse_row_steps),
    ("guidance_scale_column", Col.GUIDANCE_SCALE, parse_row_guidance_scale),
    ("width_column", Col.WIDTH, parse_row_side),
    ("height_column", Col.HEIGHT, parse_row_side),
)

# With an images_per_prompt column, a row's ordinals are row_ordinal * this + image index:
# the most images a row may ask for, so ordinals stay unique and do not depend on the
# other rows' values.
ORDINAL_STRIDE = int(IMAGES_PER_PROMPT_RULE.high)


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


def _signed(dtype: pa.DataType) -> pa.DataType:
    """The type with every uint64 in it (nested too) made int64."""
    if dtype == pa.uint64():
        return pa.int64()
    if pa.types.is_dictionary(dtype):
        value_type = _signed(dtype.value_type)
        return dtype if value_type == dtype.value_type else value_type
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        item = _signed(dtype.value_type)
        if item == dtype.value_type:
            return dtype
        field = dtype.value_field.with_type(item)
        return pa.list_(field) if pa.types.is_list(dtype) else pa.large_list(field)
    if pa.types.is_fixed_size_list(dtype):
        item = _signed(dtype.value_type)
        if item == dtype.value_type:
            return dtype
        return pa.list_(dtype.value_field.with_type(item), dtype.list_size)
    if pa.types.is_struct(dtype):
        fields = [dtype.field(i) for i in range(dtype.num_fields)]
        signed = [field.with_type(_signed(field.type)) for field in fields]
        return dtype if signed == fields else pa.struct(signed)
    if pa.types.is_map(dtype):
        key, item = _signed(dtype.key_type), _signed(dtype.item_type)
        if key == dtype.key_type and item == dtype.item_type:
            return dtype
        return pa.map_(key, item)
    return dtype


def _without_uint64(
    values: pa.ChunkedArray, column: str, problems: dict[int, list[str]]
) -> pa.ChunkedArray:
    """A passthrough column with no unsigned 64-bit values: readers of the manifest and
    sidecars (pandas, `datasets`, JSON through C longs) overflow on those above 2**63-1. It
    is cast to int64 where every value fits; a row whose value does not becomes an error
    row naming the column, and its value null."""
    target = _signed(values.type)
    if target == values.type:
        return values
    try:
        return values.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    flat = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if isinstance(flat, pa.DictionaryArray):
        flat = flat.dictionary_decode()
    fits = []
    for row in range(len(flat)):
        try:
            # A fresh array: a slice of a nested array shares (and casts) all its children.
            pa.array([flat[row].as_py()], flat.type).cast(target)
            fits.append(True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            fits.append(False)
            problems.setdefault(row, []).append(
                f"passthrough column {column!r}: value {flat[row].as_py()!r} does not fit a "
                "signed 64-bit integer (readers take no larger one)"
            )
    kept = pc.if_else(pa.array(fits), flat, pa.nulls(len(flat), flat.type))
    return pa.chunked_array([kept.cast(target)])


def _passthrough_column(
    table: pa.Table, column: str, problems: dict[int, list[str]]
) -> pa.ChunkedArray:
    """A passthrough column as it is, unless it holds text that is not valid UTF-8: then
    with those values escaped (the manifest and sidecars must stay readable) and a
    problem on their rows; or unsigned 64-bit integers: then as int64 (`_without_uint64`).
    Timestamps are kept as they are, with or without a time zone: they are the user's."""
    values = _without_uint64(table.column(column), column, problems)
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


def made_from_of(prompt: Any, negative: Any, seed: int, settings: dict[str, Any]) -> str:
    """`keys.made_from_digest` of one work row (`settings`: its generation parameters)."""
    return made_from_digest(
        prompt if isinstance(prompt, str) else None,
        negative if isinstance(negative, str) else None,
        seed,
        settings[Col.STEPS],
        settings[Col.GUIDANCE_SCALE],
        settings[Col.WIDTH],
        settings[Col.HEIGHT],
    )


class RowExpander:
    """Input rows in, one work row per (row, image index) out.

    Each work row carries its id, key, seed, ordinal and generation parameters, plus
    status/error when the row cannot be generated.
    """

    def __init__(self, spec: JobSpec):
        self.input = spec.input
        self.images_per_prompt = spec.generation.images_per_prompt
        self.job_seed = spec.generation.seed
        self.default_negative = spec.generation.negative_prompt
        self.defaults = spec.row_defaults()

    def expand(self, table: pa.Table) -> pa.Table:
        """Every work row of these input rows."""
        spec = self.input
        parameter_columns = spec.parameter_columns
        role_columns = [
            spec.prompt_column,
            spec.id_column,
            spec.negative_prompt_column,
            spec.seed_column,
            *parameter_columns.values(),
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
        parameters = [
            (
                parameter_columns[role],
                work_column,
                parse,
                _column_values(table, parameter_columns[role]),
            )
            for role, work_column, parse in _PARAMETERS
        ]
        images_column = spec.images_per_prompt_column
        image_counts = _column_values(table, images_column)
        stride = ORDINAL_STRIDE if images_column else self.images_per_prompt
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
                problems.append(f"seed column {spec.seed_column!r}: {seed_problem}")
            settings = dict(self.defaults)
            for column, work_column, parse, values in parameters:
                value, problem = parse(values[row])
                if problem:
                    problems.append(f"{work_column} column {column!r}: {problem}")
                elif value is not None:
                    settings[work_column] = value
            count, count_problem = parse_row_images_per_prompt(image_counts[row])
            if count_problem:
                problems.append(f"images_per_prompt column {images_column!r}: {count_problem}")
            # The rule planning counts with: one (error) row for a bad value.
            images = images_of_row(image_counts[row], self.images_per_prompt)
            negative = negatives[row] if negatives[row] is not None else self.default_negative
            for image_index in range(images):
                take.append(row)
                seed = image_seed(row_seed, self.job_seed, row_id, image_index)
                out[Col.ID].append(row_id)
                out[Col.IMAGE_INDEX].append(image_index)
                out[Col.KEY].append(sample_key(row_id, image_index))
                out[Col.SEED].append(seed)
                out[Col.MADE_FROM].append(made_from_of(prompts[row], negative, seed, settings))
                out[Col.ORDINAL].append(row_ordinals[row] * stride + image_index)
                out[Col.PROMPT].append(prompts[row])
                out[Col.NEGATIVE_PROMPT].append(negative)
                for name, value in settings.items():
                    out[name].append(value)
                out[Col.SOURCE].append(sources[row])
                out[Col.ROW_INDEX].append(row_indices[row])
                out[Col.STATUS].append(STATUS_ERROR if problems else STATUS_OK)
                out[Col.ERROR].append("; ".join(problems) if problems else None)

        columns = {field.name: pa.array(out[field.name], field.type) for field in WORK_FIELDS}
        indices = pa.array(take, pa.int64())
        for column in spec.passthrough_columns:
            columns[column] = passthrough[column].take(indices)
        return pa.table(columns)


def planned_images(
    spec: JobSpec,
    plan: InputPlan,
    columns: Sequence[str],
    input_filesystem: Any | None = None,
    workers: int = 8,
) -> Iterator[pa.Table]:
    """The work rows of every image the input plans (every work row),
    `columns` only, a row group at a time: what `verify --spec` checks the output against
    and an accumulating run counts its committed images with, read here on a few threads."""
    reader = RowGroupReader(spec.input, input_filesystem)
    expander = RowExpander(spec)

    def expected(unit: dict[str, Any]) -> pa.Table:
        return expander.expand(reader.read_unit(unit)).select(list(columns))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        yield from bounded_map(pool, expected, plan.read_units(), 2 * max(1, workers))


def planned_keys(
    spec: JobSpec, plan: InputPlan, input_filesystem: Any | None = None, workers: int = 3
) -> KeySet:
    """The keys of every image the input plans, each with what it is made from.

    Few workers: expanding rows is Python under the GIL, so more threads add no speed,
    only row groups held at once (bench.planned_keys: the driver's peak memory)."""
    keys: list[np.ndarray] = []
    made: list[np.ndarray] = []
    columns = [Col.KEY, Col.MADE_FROM]
    for table in planned_images(spec, plan, columns, input_filesystem, workers):
        keys.append(np.array([key_digest(k) for k in table.column(Col.KEY).to_pylist()], "S16"))
        made.append(np.array(made_from_bytes(table.column(Col.MADE_FROM).to_pylist()), "S16"))
    if not keys:
        return KeySet()
    return KeySet(np.concatenate(keys), np.concatenate(made))


def find_planned(
    spec: JobSpec, plan: InputPlan, wanted: KeySet, input_filesystem: Any | None = None
) -> dict[str, Any] | None:
    """The first planned image whose key is in `wanted` (its id, image index, file and
    row), to name an example in a message; None if the input plans none of them."""
    columns = [Col.KEY, Col.ID, Col.IMAGE_INDEX, Col.SOURCE, Col.ROW_INDEX]
    for table in planned_images(spec, plan, columns, input_filesystem):
        hits = wanted.contains_many(table.column(Col.KEY).to_pylist())
        if hits.any():
            return table.filter(pa.array(hits)).slice(0, 1).to_pylist()[0]
    return None
