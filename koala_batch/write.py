"""Write stage: one WebDataset tar and one Parquet manifest per shard, tar first.

The manifest is written only after the tar is complete, so a reader that trusts
manifests never sees a partial shard (the layout and the commit rule: `layout.py`).
Shard names derive from their rows, so a retried write lands on the same names and a
shard whose manifest already exists is never written again.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from koala_batch.config import JobSpec, reveal_storage_options
from koala_batch.errors import RunSupersededError, StageInputError
from koala_batch.keys import shard_name
from koala_batch.layout import (
    JOB_FILE,
    image_member,
    manifest_path,
    sidecar_member,
    summary_from_manifest,
    tar_bytes_metadata,
    tar_path,
)
from koala_batch.schemas import (
    MANIFEST_COLUMNS,
    MANIFEST_FIELDS,
    SIDECAR_COLUMNS,
    SPEC_CONSTANT_COLUMNS,
    STATUS_OK,
    SUMMARY_SCHEMA,
    Col,
    require_columns,
)
from koala_batch.storage import Storage

# The manifest columns copied from the rows (the others come from the spec and the shard).
_ROW_COLUMNS = tuple(
    name for name in MANIFEST_COLUMNS if name not in (*SPEC_CONSTANT_COLUMNS, Col.SHARD, Col.MEMBER)
)


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

    def __call__(self, table: pa.Table) -> pa.Table:
        require_columns(
            table, [*_ROW_COLUMNS, Col.IMAGE, Col.GENERATED_AT, *self.passthrough], "write"
        )
        table = table.sort_by(Col.ORDINAL)
        keys = table.column(Col.KEY).to_pylist()
        shard = shard_name(min(table.column(Col.ORDINAL).to_pylist()), keys)
        storage = self.storage
        if storage.exists(manifest_path(shard)):
            # Committed already: by this run's earlier attempt (keep it), or by a run that
            # took the output over, in which case this run must stop, not count it as its own.
            self.check_still_owner()
            existing = pq.read_table(io.BytesIO(storage.read_bytes(manifest_path(shard))))
            return pa.Table.from_pylist(
                [summary_from_manifest(storage, shard, existing)], schema=SUMMARY_SCHEMA
            )
        manifest = self.build_manifest(table, shard)
        images = table.column(Col.IMAGE).to_pylist()
        with tempfile.TemporaryDirectory(prefix="koala-shard-") as scratch:
            local_tar = os.path.join(scratch, f"{shard}.tar")
            self.write_tar(manifest, images, local_tar)
            recorded = tar_bytes_metadata(os.path.getsize(local_tar))
            manifest = manifest.replace_schema_metadata(
                {**(manifest.schema.metadata or {}), **recorded}
            )
            self.check_still_owner()
            storage.upload_file(local_tar, tar_path(shard))
        buffer = io.BytesIO()
        pq.write_table(manifest, buffer, compression="zstd")
        # Checked again right before the commit point: the window for a writer of a
        # superseded run is this one PUT (and the driver retires what slips through).
        self.check_still_owner()
        storage.write_bytes(manifest_path(shard), buffer.getvalue())
        summary = summary_from_manifest(storage, shard, manifest)
        summary["committed_at"] = time.time()
        summary["generated_at"] = table.column(Col.GENERATED_AT).to_pylist()
        return pa.Table.from_pylist([summary], schema=SUMMARY_SCHEMA)
