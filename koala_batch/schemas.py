"""Column names and the table each stage hands the next, defined once.

    read      -> READ_COLUMNS      + the input columns the spec names
    validate  -> WORK_FIELDS       + passthrough columns   (one row per image)
    generate  -> GENERATED_FIELDS  + passthrough columns   (encoded image bytes)
    write     -> MANIFEST_FIELDS   + passthrough columns   (the manifest a reader sees)
              -> SUMMARY_SCHEMA                            (one stats row per shard)

Every stage calls `require_columns` on its input, so a graph wired wrong fails with the
stage and the missing column named, not with a KeyError deep inside a Ray worker.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

from koala_batch.errors import StageInputError

STATUS_OK = "ok"
STATUS_ERROR = "error"


class Col:
    """Names of the columns koala-batch itself reads or writes."""

    # provenance, added by the read stage
    SOURCE = "source"
    ROW_INDEX = "row_index"
    ROW_ORDINAL = "row_ordinal"
    # one work row per image, from the validate stage
    ID = "id"
    IMAGE_INDEX = "image_index"
    KEY = "key"
    SEED = "seed"
    ORDINAL = "ordinal"
    PROMPT = "prompt"
    NEGATIVE_PROMPT = "negative_prompt"
    STATUS = "status"
    ERROR = "error"
    # generate (and encode, inside the generator actor)
    PROMPT_TRUNCATED = "prompt_truncated"
    IMAGE = "image"
    SHA256 = "sha256"
    BYTES = "bytes"
    GENERATED_AT = "generated_at"
    # write: constant per job, and where the image went
    STEPS = "steps"
    GUIDANCE_SCALE = "guidance_scale"
    WIDTH = "width"
    HEIGHT = "height"
    MODEL = "model"
    IMAGE_FORMAT = "image_format"
    SHARD = "shard"
    MEMBER = "member"


READ_COLUMNS = (Col.SOURCE, Col.ROW_INDEX, Col.ROW_ORDINAL)

WORK_FIELDS = (
    pa.field(Col.ID, pa.string()),
    pa.field(Col.IMAGE_INDEX, pa.int32()),
    pa.field(Col.KEY, pa.string()),
    pa.field(Col.SEED, pa.uint64()),
    pa.field(Col.ORDINAL, pa.int64()),
    pa.field(Col.PROMPT, pa.string()),
    pa.field(Col.NEGATIVE_PROMPT, pa.string()),
    pa.field(Col.SOURCE, pa.string()),
    pa.field(Col.ROW_INDEX, pa.int64()),
    pa.field(Col.STATUS, pa.string()),
    pa.field(Col.ERROR, pa.string()),
)
WORK_SCHEMA = pa.schema(WORK_FIELDS)

GENERATED_FIELDS = (
    *WORK_FIELDS,
    pa.field(Col.PROMPT_TRUNCATED, pa.bool_()),
    pa.field(Col.IMAGE, pa.binary()),
    pa.field(Col.SHA256, pa.string()),
    pa.field(Col.BYTES, pa.int64()),
    # unix seconds when the image left the pipeline: the job's commit timeline
    pa.field(Col.GENERATED_AT, pa.float64()),
)

MANIFEST_FIELDS = (
    pa.field(Col.KEY, pa.string(), nullable=False),
    pa.field(Col.ID, pa.string(), nullable=False),
    pa.field(Col.IMAGE_INDEX, pa.int32(), nullable=False),
    pa.field(Col.PROMPT, pa.string()),
    pa.field(Col.NEGATIVE_PROMPT, pa.string()),
    pa.field(Col.PROMPT_TRUNCATED, pa.bool_()),
    pa.field(Col.SEED, pa.uint64(), nullable=False),
    pa.field(Col.STEPS, pa.int32(), nullable=False),
    pa.field(Col.GUIDANCE_SCALE, pa.float64(), nullable=False),
    pa.field(Col.WIDTH, pa.int32(), nullable=False),
    pa.field(Col.HEIGHT, pa.int32(), nullable=False),
    pa.field(Col.MODEL, pa.string(), nullable=False),
    pa.field(Col.IMAGE_FORMAT, pa.string(), nullable=False),
    pa.field(Col.SHARD, pa.string(), nullable=False),
    pa.field(Col.MEMBER, pa.string()),
    pa.field(Col.SHA256, pa.string()),
    pa.field(Col.BYTES, pa.int64(), nullable=False),
    pa.field(Col.STATUS, pa.string(), nullable=False),
    pa.field(Col.ERROR, pa.string()),
    pa.field(Col.SOURCE, pa.string(), nullable=False),
    pa.field(Col.ROW_INDEX, pa.int64(), nullable=False),
    pa.field(Col.ORDINAL, pa.int64(), nullable=False),
)
MANIFEST_COLUMNS = tuple(field.name for field in MANIFEST_FIELDS)

# Manifest columns whose value is the same for every row of a job (from the spec).
SPEC_CONSTANT_COLUMNS = (
    Col.STEPS,
    Col.GUIDANCE_SCALE,
    Col.WIDTH,
    Col.HEIGHT,
    Col.MODEL,
    Col.IMAGE_FORMAT,
)

# What the `{key}.json` sidecar of each image holds (before the passthrough columns).
SIDECAR_COLUMNS = (
    Col.KEY,
    Col.ID,
    Col.IMAGE_INDEX,
    Col.PROMPT,
    Col.NEGATIVE_PROMPT,
    Col.PROMPT_TRUNCATED,
    Col.SEED,
    *SPEC_CONSTANT_COLUMNS,
)

SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string()),
        pa.field("tar", pa.string()),
        pa.field("manifest", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("ok", pa.int64()),
        pa.field("errors", pa.int64()),
        pa.field("image_bytes", pa.int64()),
        pa.field("first_ordinal", pa.int64()),
        # this run's timing (null for shards committed by an earlier run): unix seconds
        pa.field("committed_at", pa.float64()),
        pa.field("generated_at", pa.list_(pa.float64())),
    ]
)
# Summary fields that describe one run, not the shard: left out of the job record.
RUN_TIMING_FIELDS = ("committed_at", "generated_at")

# Every name koala-batch adds on the way to the manifest: a passthrough column may not
# reuse one (it would overwrite it or be overwritten).
RESERVED_COLUMNS = frozenset(
    {
        *READ_COLUMNS,
        *(f.name for f in GENERATED_FIELDS),
        *MANIFEST_COLUMNS,
    }
)


def field_names(fields: Iterable[pa.Field]) -> tuple[str, ...]:
    """The names of a sequence of fields, in order."""
    return tuple(field.name for field in fields)


def require_columns(table: pa.Table, columns: Iterable[str], stage: str) -> None:
    """Raise StageInputError naming the stage and every column it needs but did not get."""
    present = set(table.column_names)
    missing = [column for column in columns if column not in present]
    if missing:
        raise StageInputError(
            f"{stage} stage: input table lacks column(s) {', '.join(missing)} "
            f"(it has {', '.join(table.column_names) or 'none'})"
        )
