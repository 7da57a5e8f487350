"""The parquet format: a shard is one Parquet file, a row per ok image with its bytes in an
`image` column (the Arrow storage of a Hugging Face `datasets` Image, its features in the
file's metadata), row groups of about `ROW_GROUP_BYTES` of images."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from koala_batch.output.formats.base import (
    CardRecipes,
    OutputFormat,
    Problems,
    ShardToScan,
    ShardToWrite,
    check_image,
    ok_rows,
    output_url,
    short,
    unlisted,
)
from koala_batch.output.layout import (
    HUGGINGFACE_METADATA,
    IMAGE_COLUMN,
    IMAGE_TYPE,
    PARQUET,
    SHARDS_DIR,
    OutputListing,
    ShardRecord,
    data_metadata,
    parquet_path,
)
from koala_batch.schemas import MANIFEST_COLUMNS, STATUS_OK, Col
from koala_batch.storage import Storage

# Image bytes per row group of a parquet shard: readers fetch and decode a row group at
# a time, and about 100 MB keeps that cheap while the footer stays small.
ROW_GROUP_BYTES = 100 * 2**20


class ParquetShards(OutputFormat):
    """Shards as Parquet files of images and their rows: `shards/{shard}.parquet`."""

    name = PARQUET
    data_kind = "Parquet file"
    data_glob = f"{SHARDS_DIR}/*.parquet"

    def data_path(self, shard: str) -> str:
        return parquet_path(shard)

    def damage(self, listing: OutputListing, shard: str, record: ShardRecord) -> str | None:
        return listing.size_damage("Parquet file", parquet_path(shard), record.data_bytes)

    def write(
        self, storage: Storage, shard: ShardToWrite, check_owner: Callable[[], None]
    ) -> dict[bytes, bytes]:
        if not shard.has_images():
            check_owner()
            return data_metadata(PARQUET, 0)  # no data file: `ShardRecord.has_data_file`
        with tempfile.TemporaryDirectory(prefix="koala-shard-") as scratch:
            local = os.path.join(scratch, f"{shard.name}.parquet")
            write_parquet_shard(shard.manifest, shard.images, local)
            recorded = data_metadata(PARQUET, os.path.getsize(local))
            check_owner()
            storage.upload_file(local, parquet_path(shard.name))
        return recorded

    def scan(self, storage: Storage, shard: ShardToScan) -> tuple[Problems, int]:
        return scan_parquet(storage, shard)

    def read_images(
        self, storage: Storage, shard: str, rows: Sequence[dict[str, Any]]
    ) -> dict[str, bytes]:
        keys = [row[Col.KEY] for row in rows]
        with storage.open_read(parquet_path(shard)) as handle:
            table = pq.read_table(
                handle, columns=[Col.KEY, IMAGE_COLUMN], filters=pc.field(Col.KEY).isin(keys)
            )
        return {
            key: image["bytes"]
            for key, image in zip(
                table.column(Col.KEY).to_pylist(),
                table.column(IMAGE_COLUMN).to_pylist(),
                strict=True,
            )
        }

    def card_recipes(self, uri: str) -> CardRecipes:
        shards = output_url(uri, SHARDS_DIR)
        files = output_url(uri, self.data_glob)
        return CardRecipes(
            datasets=f'ds = load_dataset("parquet", data_files="{files}", split="train")',
            webdataset=(
                "Not for this format: the images are in Parquet files "
                "(`output.format: webdataset` writes tars)."
            ),
            ray=f'ds = ray.data.read_parquet("{shards}/")  # image bytes in the `image` column',
            duckdb_table=files,
            hub_configs=True,
        )


# `datasets` Value dtypes of the Arrow types a manifest column may have; a column of any
# other type (a nested passthrough column) is left out of the features, and `datasets`
# infers it from the Arrow schema as it would for a file it did not write.
_DATASETS_DTYPES = {
    pa.bool_(): "bool",
    pa.int8(): "int8",
    pa.int16(): "int16",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.uint8(): "uint8",
    pa.uint16(): "uint16",
    pa.uint32(): "uint32",
    pa.uint64(): "uint64",
    pa.float16(): "float16",
    pa.float32(): "float32",
    pa.float64(): "float64",
    pa.string(): "string",
    pa.large_string(): "large_string",
    pa.binary(): "binary",
    pa.large_binary(): "large_binary",
    pa.date32(): "date32",
    pa.date64(): "date64",
}


def _datasets_dtype(arrow_type: pa.DataType) -> str | None:
    if pa.types.is_timestamp(arrow_type):
        zone = f", tz={arrow_type.tz}" if arrow_type.tz else ""
        return f"timestamp[{arrow_type.unit}{zone}]"
    return _DATASETS_DTYPES.get(arrow_type)


def huggingface_metadata(schema: pa.Schema) -> dict[bytes, bytes]:
    """The Parquet metadata `datasets` writes for a table of this schema, with its `image`
    column an Image feature: what makes `load_dataset("parquet", ...)` decode PIL images."""
    features: dict[str, Any] = {}
    for field in schema:
        if field.name == IMAGE_COLUMN:
            features[field.name] = {"_type": "Image"}
        elif (dtype := _datasets_dtype(field.type)) is not None:
            features[field.name] = {"dtype": dtype, "_type": "Value"}
    return {HUGGINGFACE_METADATA: json.dumps({"info": {"features": features}}).encode()}


def row_group_bounds(sizes: list[int], target: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of about `target` bytes each (a larger row alone)."""
    bounds: list[tuple[int, int]] = []
    start, total = 0, 0
    for index, size in enumerate(sizes):
        if index > start and total + size > target:
            bounds.append((start, index))
            start, total = index, 0
        total += size
    if start < len(sizes):
        bounds.append((start, len(sizes)))
    return bounds


def _leaf_paths(schema: pa.Schema) -> list[str]:
    # Parquet's per-column options name leaf columns (`image.bytes`, `tags.list.element`).
    buffer = io.BytesIO()
    pq.write_table(schema.empty_table(), buffer)
    parquet_schema = pq.ParquetFile(io.BytesIO(buffer.getvalue())).schema
    return [parquet_schema.column(index).path for index in range(len(parquet_schema))]


def write_parquet_shard(manifest: pa.Table, images: list[bytes | None], local_path: str) -> None:
    """A parquet shard: one row per ok image, `image` (bytes and member name) first, then
    every manifest column; zstd, but the already compressed image bytes are stored as they
    are, without dictionary or statistics."""
    rows, kept = ok_rows(manifest, images)
    rows = rows.replace_schema_metadata(None)
    schema = pa.schema([pa.field(IMAGE_COLUMN, IMAGE_TYPE), *rows.schema])
    schema = schema.with_metadata(huggingface_metadata(schema))
    image_bytes = f"{IMAGE_COLUMN}.bytes"
    leaves = _leaf_paths(schema)
    others = [leaf for leaf in leaves if leaf != image_bytes]
    with pq.ParquetWriter(
        local_path,
        schema,
        compression={leaf: "none" if leaf == image_bytes else "zstd" for leaf in leaves},
        use_dictionary=others,
        write_statistics=others,
    ) as writer:
        bounds = row_group_bounds([len(image) for image in kept], ROW_GROUP_BYTES) or [(0, 0)]
        for start, stop in bounds:
            group = rows.slice(start, stop - start)
            image = pa.StructArray.from_arrays(
                [
                    pa.array(kept[start:stop], pa.binary()),
                    group.column(Col.MEMBER).combine_chunks(),
                ],
                fields=list(IMAGE_TYPE),
            )
            writer.write_table(
                pa.Table.from_arrays([image, *group.columns], schema=schema),
                row_group_size=max(1, stop - start),
            )


def scan_parquet(storage: Storage, shard: ShardToScan) -> tuple[Problems, int]:
    """Read a parquet shard a row group at a time, checking every row; (problems, images
    decoded)."""
    name, images, statuses = shard.name, shard.images, shard.statuses
    problems = Problems(shard.limit)
    decoded = 0
    path = parquet_path(name)
    seen: Counter[str] = Counter()
    with storage.open_read(path) as handle:
        parquet = pq.ParquetFile(handle)
        schema = parquet.schema_arrow
        if IMAGE_COLUMN not in schema.names or schema.field(IMAGE_COLUMN).type != IMAGE_TYPE:
            problems.add(f"shard {name}: {path} has no {IMAGE_COLUMN} column of type {IMAGE_TYPE}")
            return problems, decoded
        missing = [column for column in MANIFEST_COLUMNS if column not in schema.names]
        if missing:
            problems.add(f"shard {name}: {path} lacks manifest column(s) {', '.join(missing)}")
        try:
            features = json.loads((schema.metadata or {})[HUGGINGFACE_METADATA])["info"]["features"]
        except (KeyError, TypeError, ValueError):
            features = {}
        if features.get(IMAGE_COLUMN) != {"_type": "Image"}:
            problems.add(
                f"shard {name}: {path} does not declare its {IMAGE_COLUMN} column a Hugging "
                f"Face Image in its {HUGGINGFACE_METADATA.decode()} metadata"
            )
        identity = [c for c in (Col.KEY, Col.ID, Col.IMAGE_INDEX, Col.STATUS) if c in schema.names]
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=[IMAGE_COLUMN, *identity])
            for row in table.to_pylist():
                image = row[IMAGE_COLUMN] or {}
                member = str(image.get("path"))
                seen[member] += 1
                if seen[member] == 2:
                    problems.add(f"shard {name}: member {member} appears more than once in {path}")
                if seen[member] > 1:
                    continue
                if member not in images:
                    problems.add(unlisted(name, str(member), path, statuses))
                    continue
                expected = images[member]
                if row.get(Col.STATUS, STATUS_OK) != STATUS_OK:
                    problems.add(f"shard {name}: member {member} of {path} is an error row")
                for column in (Col.KEY, Col.ID, Col.IMAGE_INDEX):
                    if column in row and row[column] != expected[column]:
                        problems.add(
                            f"shard {name}: member {member} of {path} has {column}="
                            f"{short(row[column])}, the manifest says {short(expected[column])}"
                        )
                decoded += check_image(name, member, image.get("bytes") or b"", expected, problems)
    for member, row in images.items():
        if not seen[member]:
            problems.add(
                f"shard {name}: key {row[Col.KEY]}: member {member} is missing from {path}"
            )
    return problems, decoded
