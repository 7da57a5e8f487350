"""Write stage: one WebDataset tar and one Parquet manifest per shard, tar first.

Output layout under the output prefix:

    shards/{shard}.tar            {key}.{png|jpg|webp} + {key}.json per image
    manifests/{shard}.parquet     one row per image, errors included
    _job.json                     fingerprint of what decides the images (written first)
    _SUCCESS                      the job record (written last)

A shard is committed once its manifest exists; the manifest is written only after
the tar is complete, so a reader that trusts manifests never sees a partial shard.
Shard names derive from their rows, so a retried write lands on the same names and a
shard whose manifest already exists is never written again.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from koala_batch.config import JobSpec
from koala_batch.encode import EXTENSIONS
from koala_batch.keys import shard_name
from koala_batch.storage import Storage
from koala_batch.validate import STATUS_OK

SHARDS_DIR = "shards"
MANIFESTS_DIR = "manifests"
JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS"

MANIFEST_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("id", pa.string(), nullable=False),
    pa.field("image_index", pa.int32(), nullable=False),
    pa.field("prompt", pa.string()),
    pa.field("negative_prompt", pa.string()),
    pa.field("prompt_truncated", pa.bool_()),
    pa.field("seed", pa.uint64(), nullable=False),
    pa.field("steps", pa.int32(), nullable=False),
    pa.field("guidance_scale", pa.float64(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("image_format", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("member", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("source", pa.string(), nullable=False),
    pa.field("row_index", pa.int64(), nullable=False),
    pa.field("ordinal", pa.int64(), nullable=False),
]
MANIFEST_COLUMNS = [field.name for field in MANIFEST_FIELDS]

class RunSupersededError(RuntimeError):
    """Another run claimed the output: a writer of the old run must not commit."""


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
    ]
)


def tar_path(shard: str) -> str:
    return f"{SHARDS_DIR}/{shard}.tar"


def manifest_path(shard: str) -> str:
    return f"{MANIFESTS_DIR}/{shard}.parquet"


def _json_safe(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def sample_metadata(row: dict[str, Any], passthrough: list[str]) -> bytes:
    """The `{key}.json` member: what made the image, plus the passthrough columns."""
    fields = ["key", "id", "image_index", "prompt", "negative_prompt", "prompt_truncated", "seed",
              "steps", "guidance_scale", "width", "height", "model", "image_format"]
    record = {name: row[name] for name in fields}
    record.update({name: row[name] for name in passthrough})
    return json.dumps(record, ensure_ascii=False, default=_json_safe).encode("utf-8")


def _add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata: the same rows always give the same tar bytes.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


def summary_from_manifest(storage: Storage, shard: str, manifest: pa.Table) -> dict[str, Any]:
    """The per-shard stats row, computed from a committed manifest."""
    statuses = manifest.column("status").to_pylist()
    ok = sum(1 for status in statuses if status == STATUS_OK)
    ordinals = manifest.column("ordinal").to_pylist()
    return {
        "shard": shard,
        "tar": storage.url(tar_path(shard)),
        "manifest": storage.url(manifest_path(shard)),
        "rows": manifest.num_rows,
        "ok": ok,
        "errors": manifest.num_rows - ok,
        "image_bytes": int(sum(b for b in manifest.column("bytes").to_pylist() if b)),
        "first_ordinal": min(ordinals) if ordinals else 0,
    }


class WriteShard:
    """Task stage: one block of encoded rows in, one committed shard and its stats row out."""

    def __init__(self, spec: JobSpec, output_filesystem: Any | None = None,
                 run_id: str | None = None):
        from koala_batch.config import reveal_storage_options

        self.output_uri = spec.output.uri
        self.output_options = reveal_storage_options(spec.output.storage_options)
        self.output_filesystem = output_filesystem
        self.run_id = run_id
        self.extension = EXTENSIONS[spec.output.image_format]
        self.passthrough = list(spec.input.passthrough_columns)
        self.constants = {
            "steps": spec.resolved_steps,
            "guidance_scale": spec.resolved_guidance_scale,
            "width": spec.generation.width,
            "height": spec.generation.height,
            "model": spec.model.name,
            "image_format": spec.output.image_format,
        }
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
                f"output {self.storage.url('')} now belongs to run {owner}, not {self.run_id}: "
                "this writer stops without committing"
            )

    def build_manifest(self, table: pa.Table, shard: str) -> pa.Table:
        count = table.num_rows
        statuses = table.column("status").to_pylist()
        keys = table.column("key").to_pylist()
        members = [f"{key}.{self.extension}" if status == STATUS_OK else None
                   for key, status in zip(keys, statuses)]
        columns: dict[str, pa.Array] = {}
        for field in MANIFEST_FIELDS:
            if field.name in self.constants:
                columns[field.name] = pa.array([self.constants[field.name]] * count, field.type)
            elif field.name == "shard":
                columns[field.name] = pa.array([shard] * count, field.type)
            elif field.name == "member":
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
            for row, image in zip(rows, images):
                if row["status"] != STATUS_OK:
                    continue
                _add_member(archive, row["member"], image)
                _add_member(archive, f"{row['key']}.json", sample_metadata(row, self.passthrough))

    def __call__(self, table: pa.Table) -> pa.Table:
        table = table.sort_by("ordinal")
        keys = table.column("key").to_pylist()
        shard = shard_name(min(table.column("ordinal").to_pylist()), keys)
        storage = self.storage
        if storage.exists(manifest_path(shard)):
            # A retry of a write that already committed: keep what is there.
            existing = pq.read_table(io.BytesIO(storage.read_bytes(manifest_path(shard))))
            return pa.Table.from_pylist([summary_from_manifest(storage, shard, existing)],
                                        schema=SUMMARY_SCHEMA)
        manifest = self.build_manifest(table, shard)
        images = table.column("image").to_pylist()
        with tempfile.TemporaryDirectory(prefix="koala-shard-") as scratch:
            local_tar = os.path.join(scratch, f"{shard}.tar")
            self.write_tar(manifest, images, local_tar)
            self.check_still_owner()
            storage.upload_file(local_tar, tar_path(shard))
        buffer = io.BytesIO()
        pq.write_table(manifest, buffer, compression="zstd")
        # Checked again right before the commit point: the window for a writer of a
        # superseded run is this one PUT (and the driver retires what slips through).
        self.check_still_owner()
        storage.write_bytes(manifest_path(shard), buffer.getvalue())
        return pa.Table.from_pylist([summary_from_manifest(storage, shard, manifest)],
                                    schema=SUMMARY_SCHEMA)
