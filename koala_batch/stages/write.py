"""Write stage: per shard, its data in the output's format, then its Parquet manifest.

The data are written by the output format's class (`output.formats`): a WebDataset tar, a
Parquet file with an `image` column, or a folder of image files and its metadata.parquet.
They hold the ok rows only: error rows live in the manifest alone.

The manifest is written only after the data are complete, so a reader that trusts
manifests never sees a partial shard (the layout and the commit rule: `layout.py`).
Shard names derive from their rows, so a retried write lands on the same names (with the
same bytes) and a shard whose manifest already exists is never written again.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from koala_batch.errors import RunSupersededError
from koala_batch.keys import shard_name
from koala_batch.output.formats import FORMATS
from koala_batch.output.formats.base import ShardToWrite
from koala_batch.output.layout import (
    JOB_FILE,
    image_member,
    manifest_path,
    stats_metadata,
    summary_from_manifest,
)
from koala_batch.output.stats import shard_stats
from koala_batch.schemas import (
    MANIFEST_COLUMNS,
    MANIFEST_FIELDS,
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
        recorded = FORMATS[self.output_format].write(
            storage,
            ShardToWrite(shard, manifest, images, self.passthrough),
            self.check_still_owner,
        )
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
