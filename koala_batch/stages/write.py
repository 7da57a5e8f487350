"""Write stage: per shard, its data in the output's format, then its Parquet manifest.

The data are a WebDataset tar, a Parquet file with an `image` column (the Arrow storage
of a Hugging Face `datasets` Image, its features in the file's metadata, row groups of
about `ROW_GROUP_BYTES` of images), or a folder of image files and its metadata.parquet
(`layout.py`). They hold the ok rows only: error rows live in the manifest alone.

The manifest is written only after the data are complete, so a reader that trusts
manifests never sees a partial shard (the layout and the commit rule: `layout.py`).
Shard names derive from their rows, so a retried write lands on the same names (with the
same bytes) and a shard whose manifest already exists is never written again.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from koala_batch.errors import RunSupersededError, StageInputError
from koala_batch.keys import shard_name
from koala_batch.output.layout import (
    FILE_NAME_COLUMN,
    FILES,
    FOLDER_METADATA,
    HUGGINGFACE_METADATA,
    IMAGE_COLUMN,
    IMAGE_TYPE,
    JOB_FILE,
    PARQUET,
    data_metadata,
    folder_file_path,
    image_member,
    manifest_path,
    parquet_path,
    sidecar_member,
    stats_metadata,
    summary_from_manifest,
    tar_path,
)
from koala_batch.output.stats import shard_stats
from koala_batch.schemas import (
    MANIFEST_COLUMNS,
    MANIFEST_FIELDS,
    SIDECAR_COLUMNS,
    SPEC_CONSTANT_COLUMNS,
    STATUS_OK,
    SUMMARY_SCHEMA,
    Col,
    name_rows,
    require_columns,
    utc_timestamps,
)
from koala_batch.spec import JobSpec, reveal_storage_options
from koala_batch.storage import Storage

# The manifest columns copied from the rows (the others come from the spec and the shard).
_ROW_COLUMNS = tuple(
    name for name in MANIFEST_COLUMNS if name not in (*SPEC_CONSTANT_COLUMNS, Col.SHARD, Col.MEMBER)
)


# Image bytes per row group of a parquet shard: readers fetch and decode a row group at
# a time, and about 100 MB keeps that cheap while the footer stays small.
ROW_GROUP_BYTES = 100 * 2**20
# Concurrent uploads of one files-format shard's images (object stores take many at once).
FILE_UPLOAD_THREADS = 8

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


def ok_rows(manifest: pa.Table, images: list[bytes | None]) -> tuple[pa.Table, list[bytes]]:
    """The manifest's ok rows (what a data file holds) and their images."""
    statuses = manifest.column(Col.STATUS).to_pylist()
    keys = manifest.column(Col.KEY).to_pylist()
    indices, kept = [], []
    for index, (status, image) in enumerate(zip(statuses, images, strict=True)):
        if status != STATUS_OK:
            continue
        if image is None:
            raise StageInputError(f"write stage: ok row {keys[index]} has no image")
        indices.append(index)
        kept.append(image)
    return manifest.take(pa.array(indices, pa.int64())), kept


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


def folder_metadata(rows: pa.Table) -> bytes:
    """A files-format shard's metadata.parquet: its ok manifest rows (`ok_rows`),
    `file_name` (the image's name in the folder, as `datasets`' imagefolder reads it) first."""
    rows = rows.replace_schema_metadata(None)
    table = rows.add_column(0, pa.field(FILE_NAME_COLUMN, pa.string()), rows.column(Col.MEMBER))
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _json_safe(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def sample_metadata(row: dict[str, Any], passthrough: list[str]) -> bytes:
    """The `{key}.json` member: what made the image, plus the passthrough columns."""
    record = {name: row[name] for name in SIDECAR_COLUMNS}
    record.update({name: row[name] for name in passthrough})
    return json.dumps(record, ensure_ascii=False, default=_json_safe).encode("utf-8")


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata: the same rows always give the same tar bytes.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


class WriteShard:
    """Task stage: one block of encoded rows in, one committed shard and its stats row out."""

    def __init__(
        self, spec: JobSpec, output_filesystem: Any | None = None, run_id: str | None = None
    ):
        self.output_uri = spec.output.uri
        self.output_options = reveal_storage_options(spec.output.storage_options)
        self.output_filesystem = output_filesystem
        self.run_id = run_id
        self.image_format = spec.output.image_format
        self.output_format = spec.output.format
        self.passthrough = list(spec.input.passthrough_columns)
        self.constants = spec.spec_constants()
        self._storage: Storage | None = None

    @property
    def storage(self) -> Storage:
        if self._storage is None:
            self._storage = Storage(self.output_uri, self.output_options, self.output_filesystem)
        return self._storage

    def check_still_owner(self) -> None:
        """Raise RunSupersededError if another run has claimed the output since this one."""
        if self.run_id is None:
            return
        owner = json.loads(self.storage.read_bytes(JOB_FILE)).get("run_id")
        if owner != self.run_id:
            raise RunSupersededError(
                f"output {self.storage.url('')} now belongs to run {owner}, not {self.run_id}"
            )

    def build_manifest(self, table: pa.Table, shard: str) -> pa.Table:
        count = table.num_rows
        statuses = table.column(Col.STATUS).to_pylist()
        keys = table.column(Col.KEY).to_pylist()
        members = [
            image_member(key, self.image_format) if status == STATUS_OK else None
            for key, status in zip(keys, statuses, strict=True)
        ]
        columns: dict[str, pa.Array] = {}
        for field in MANIFEST_FIELDS:
            if field.name in self.constants:
                columns[field.name] = pa.array([self.constants[field.name]] * count, field.type)
            elif field.name == Col.SHARD:
                columns[field.name] = pa.array([shard] * count, field.type)
            elif field.name == Col.MEMBER:
                columns[field.name] = pa.array(members, field.type)
            elif field.name == Col.GENERATED_AT:
                columns[field.name] = utc_timestamps(table.column(field.name))
            else:
                columns[field.name] = table.column(field.name).cast(field.type)
        schema = pa.schema(MANIFEST_FIELDS)
        for name in self.passthrough:
            columns[name] = table.column(name)
            schema = schema.append(table.schema.field(name))
        return pa.table(columns, schema=schema)

    def write_tar(self, manifest: pa.Table, images: list[bytes | None], local_path: str) -> None:
        rows = manifest.to_pylist()
        with tarfile.open(local_path, "w", format=tarfile.USTAR_FORMAT) as archive:
            for row, image in zip(rows, images, strict=True):
                if row[Col.STATUS] != STATUS_OK:
                    continue
                if image is None:
                    raise StageInputError(f"write stage: ok row {row[Col.KEY]} has no image")
                _add_member(archive, row[Col.MEMBER], image)
                _add_member(
                    archive, sidecar_member(row[Col.KEY]), sample_metadata(row, self.passthrough)
                )

    def write_data(
        self, manifest: pa.Table, images: list[bytes | None], shard: str
    ) -> dict[bytes, bytes]:
        """Put the shard's data in the output's format, after checking this run still owns
        the output; returns the manifest metadata that records them (`layout.data_metadata`)."""
        storage = self.storage
        if self.output_format in (PARQUET, FILES) and not any(
            status == STATUS_OK for status in manifest.column(Col.STATUS).to_pylist()
        ):
            self.check_still_owner()
            return data_metadata(self.output_format, 0)  # `ShardRecord.has_data_file`
        if self.output_format == FILES:
            rows, kept = ok_rows(manifest, images)
            metadata = folder_metadata(rows)
            members = rows.column(Col.MEMBER).to_pylist()
            self.check_still_owner()
            with ThreadPoolExecutor(max_workers=FILE_UPLOAD_THREADS) as pool:
                list(
                    pool.map(
                        lambda item: storage.write_bytes(folder_file_path(shard, item[0]), item[1]),
                        zip(members, kept, strict=True),
                    )
                )
            # Last, so a folder with its metadata file holds every image it lists.
            storage.write_bytes(folder_file_path(shard, FOLDER_METADATA), metadata)
            return data_metadata(FILES, len(metadata))
        with tempfile.TemporaryDirectory(prefix="koala-shard-") as scratch:
            if self.output_format == PARQUET:
                local, target = os.path.join(scratch, f"{shard}.parquet"), parquet_path(shard)
                write_parquet_shard(manifest, images, local)
            else:
                local, target = os.path.join(scratch, f"{shard}.tar"), tar_path(shard)
                self.write_tar(manifest, images, local)
            recorded = data_metadata(self.output_format, os.path.getsize(local))
            self.check_still_owner()
            storage.upload_file(local, target)
        return recorded

    def __call__(self, table: pa.Table) -> pa.Table:
        require_columns(
            table, [*_ROW_COLUMNS, Col.IMAGE, Col.GENERATED_AT, *self.passthrough], "write"
        )
        table = table.sort_by(Col.ORDINAL)
        shard = shard_name(min(table.column(Col.ORDINAL).to_pylist()), name_rows(table))
        storage = self.storage
        if storage.exists(manifest_path(shard)):
            # Committed already: by this run's earlier attempt (keep it), or by a run that
            # took the output over, in which case this run must stop, not count it as its own.
            self.check_still_owner()
            existing = pq.read_table(io.BytesIO(storage.read_bytes(manifest_path(shard))))
            summary = summary_from_manifest(storage, shard, existing)
            summary["keys"] = existing.column(Col.KEY).to_pylist()
            return pa.Table.from_pylist([summary], schema=SUMMARY_SCHEMA)
        manifest = self.build_manifest(table, shard)
        images = table.column(Col.IMAGE).to_pylist()
        recorded = self.write_data(manifest, images, shard)
        manifest = manifest.replace_schema_metadata(
            {**(manifest.schema.metadata or {}), **recorded}
        )

        def seconds(name: str) -> list[float | None] | None:
            # Tables not made by the generator (tools, tests) have no timings to record.
            return table.column(name).to_pylist() if name in table.column_names else None

        stats = shard_stats(
            manifest,
            generate_s=seconds(Col.GENERATE_S),
            encode_s=seconds(Col.ENCODE_S),
            generated_at=table.column(Col.GENERATED_AT).to_pylist(),
            committed_at=time.time(),
        )
        manifest = manifest.replace_schema_metadata(
            {**(manifest.schema.metadata or {}), **stats_metadata(stats)}
        )
        buffer = io.BytesIO()
        pq.write_table(manifest, buffer, compression="zstd")
        # Checked again right before the commit point: the window for a writer of a
        # superseded run is this one PUT (and the driver retires what slips through).
        self.check_still_owner()
        storage.write_bytes(manifest_path(shard), buffer.getvalue())
        summary = summary_from_manifest(storage, shard, manifest)
        summary["committed_at"] = time.time()
        summary["generated_at"] = table.column(Col.GENERATED_AT).to_pylist()
        summary["keys"] = table.column(Col.KEY).to_pylist()
        return pa.Table.from_pylist([summary], schema=SUMMARY_SCHEMA)
