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
import pyarrow.compute as pc

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
    GENERATE_S = "generate_s"
    ENCODE_S = "encode_s"
    # per row (the spec's values unless the input names a column for them)
    STEPS = "steps"
    GUIDANCE_SCALE = "guidance_scale"
    WIDTH = "width"
    HEIGHT = "height"
    # digest of what the image is generated from (`keys.made_from_digest`)
    MADE_FROM = "made_from"
    # write: constant per job, and where the image went
    MODEL = "model"
    IMAGE_FORMAT = "image_format"
    SHARD = "shard"
    MEMBER = "member"


READ_COLUMNS = (Col.SOURCE, Col.ROW_INDEX, Col.ROW_ORDINAL)

WORK_FIELDS = (
    pa.field(Col.ID, pa.string()),
    pa.field(Col.IMAGE_INDEX, pa.int32()),
    pa.field(Col.KEY, pa.string()),
    # int64, never uint64: seeds are below 2**63 (keys.SEED_MODULUS) so every reader
    # takes them
    pa.field(Col.SEED, pa.int64()),
    pa.field(Col.ORDINAL, pa.int64()),
    pa.field(Col.PROMPT, pa.string()),
    pa.field(Col.NEGATIVE_PROMPT, pa.string()),
    # the generation parameters of this row's pipeline call
    pa.field(Col.STEPS, pa.int32()),
    pa.field(Col.GUIDANCE_SCALE, pa.float64()),
    pa.field(Col.WIDTH, pa.int32()),
    pa.field(Col.HEIGHT, pa.int32()),
    pa.field(Col.MADE_FROM, pa.string()),
    pa.field(Col.SOURCE, pa.string()),
    pa.field(Col.ROW_INDEX, pa.int64()),
    pa.field(Col.STATUS, pa.string()),
    pa.field(Col.ERROR, pa.string()),
)
WORK_SCHEMA = pa.schema(WORK_FIELDS)

# What decides which rows may share a pipeline call (with whether a row has a negative
# prompt): rows that differ in one of these never do.
BUCKET_COLUMNS = (Col.WIDTH, Col.HEIGHT, Col.STEPS, Col.GUIDANCE_SCALE)

GENERATED_FIELDS = (
    *WORK_FIELDS,
    pa.field(Col.PROMPT_TRUNCATED, pa.bool_()),
    pa.field(Col.IMAGE, pa.binary()),
    pa.field(Col.SHA256, pa.string()),
    pa.field(Col.BYTES, pa.int64()),
    # unix seconds when the image left the pipeline: the job's commit timeline
    pa.field(Col.GENERATED_AT, pa.float64()),
    # What the image cost: its share of its pipeline call's wall seconds (the call's
    # seconds over its images) and its encoding seconds. Summed into the shard's stats.
    pa.field(Col.GENERATE_S, pa.float64()),
    pa.field(Col.ENCODE_S, pa.float64()),
)

MANIFEST_FIELDS = (
    pa.field(Col.KEY, pa.string(), nullable=False),
    pa.field(Col.ID, pa.string(), nullable=False),
    pa.field(Col.IMAGE_INDEX, pa.int32(), nullable=False),
    pa.field(Col.PROMPT, pa.string()),
    pa.field(Col.NEGATIVE_PROMPT, pa.string()),
    pa.field(Col.PROMPT_TRUNCATED, pa.bool_()),
    pa.field(Col.SEED, pa.int64(), nullable=False),
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
    # What the row asked for, as a digest: a resume tells a committed image of a row
    # since changed under the same id from one still wanted.
    pa.field(Col.MADE_FROM, pa.string(), nullable=False),
    # When the image left the pipeline (error rows: when they were seen), as readers
    # expect a moment: microseconds, UTC (GENERATED_FIELDS carry it as unix seconds).
    pa.field(Col.GENERATED_AT, pa.timestamp("us", tz="UTC")),
)
MANIFEST_COLUMNS = tuple(field.name for field in MANIFEST_FIELDS)

# Manifest columns whose value is the same for every row of a job (from the spec).
SPEC_CONSTANT_COLUMNS = (Col.MODEL, Col.IMAGE_FORMAT)

# Manifest columns only the writer knows: where it put the image.
WRITER_COLUMNS = (Col.SHARD, Col.MEMBER)

# What `generate_images` yields, one row per image (before the passthrough columns): the
# manifest columns but the writer's, as the generator carries them (nullable: a Dataset's
# rows have no source, row_index or ordinal; moments as unix seconds), then the image bytes
# and what else the generator adds.
_GENERATED_BY_NAME = {field.name: field for field in GENERATED_FIELDS}
IMAGE_ROW_FIELDS = (
    *(
        _GENERATED_BY_NAME.get(field.name, field)
        for field in MANIFEST_FIELDS
        if field.name not in WRITER_COLUMNS
    ),
    *(field for field in GENERATED_FIELDS if field.name not in MANIFEST_COLUMNS),
)
IMAGE_ROW_SCHEMA = pa.schema(IMAGE_ROW_FIELDS)

# What the `{key}.json` sidecar of each image holds (before the passthrough columns).
SIDECAR_COLUMNS = (
    Col.KEY,
    Col.ID,
    Col.IMAGE_INDEX,
    Col.PROMPT,
    Col.NEGATIVE_PROMPT,
    Col.PROMPT_TRUNCATED,
    Col.SEED,
    Col.STEPS,
    Col.GUIDANCE_SCALE,
    Col.WIDTH,
    Col.HEIGHT,
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
        # the shard's keys, which the driver of the run that wrote it counts by
        pa.field("keys", pa.list_(pa.string())),
        # the shard's stats (`layout.recorded_stats`; null for manifests written before)
        pa.field("failures", pa.map_(pa.string(), pa.int64())),  # reason -> error rows
        pa.field("generate_s", pa.float64()),
        pa.field("encode_s", pa.float64()),
        pa.field("first_generated_at", pa.float64()),
        pa.field("last_generated_at", pa.float64()),
    ]
)
# Summary fields for the run that wrote the shard, not about the shard: left out of the
# job record.
RUN_FIELDS = ("committed_at", "generated_at", "keys")

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


def utc_timestamps(seconds: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Unix seconds (float64, as the pipeline keeps moments) as the manifest's
    `timestamp("us", tz="UTC")`: Arrow casts no float to a timestamp."""
    micros = pc.round(pc.multiply(seconds.cast(pa.float64()), 1e6)).cast(pa.int64())
    return micros.cast(pa.timestamp("us", tz="UTC"))


def require_columns(table: pa.Table, columns: Iterable[str], stage: str) -> None:
    """Raise StageInputError naming the stage and every column it needs but did not get."""
    present = set(table.column_names)
    missing = [column for column in columns if column not in present]
    if missing:
        raise StageInputError(
            f"{stage} stage: input table lacks column(s) {', '.join(missing)} "
            f"(it has {', '.join(table.column_names) or 'none'})"
        )


def name_rows(table: pa.Table) -> list[tuple[str, str, str]]:
    """(key, status, made_from) of each row: what a shard's name hashes (`keys.shard_name`)."""
    return list(
        zip(
            table.column(Col.KEY).to_pylist(),
            table.column(Col.STATUS).to_pylist(),
            table.column(Col.MADE_FROM).to_pylist(),
            strict=True,
        )
    )
