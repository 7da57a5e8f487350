"""The output layout, and the one rule for what a listed file is.

    OUTPUT/
      _job.json                    written first: the fingerprint of what decides the images
      shards/{shard}.tar           WebDataset: {key}.{ext} + {key}.json per image
      manifests/{shard}.parquet    one row per image, failed ones included
      _SUCCESS                     written last: the job record

A shard is committed once its manifest exists: the writer puts the manifest only after
the tar is complete. A tar without a manifest, or a half-written `*.partial` file, is a
leftover of a write cut short. Ownership follows the names koala-batch writes (shard
names are `keys.shard_name`'s), not the folders: anything else under the prefix, a
user's `shards/backup.tar` included, is foreign, so it is never deleted or trusted.
`classify` decides this for one file and `scan_output` for a listing; commit, verify and
the CLI all go through them.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import pyarrow as pa

from koala_batch.keys import SHARD_NAME_PATTERN
from koala_batch.schemas import STATUS_OK, Col
from koala_batch.storage import PARTIAL_SUFFIX, Storage, with_retries

SHARDS_DIR = "shards"
MANIFESTS_DIR = "manifests"
JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS"
TAR_SUFFIX = ".tar"
MANIFEST_SUFFIX = ".parquet"
# Manifest (Parquet key-value) metadata: the byte size of the shard's tar, so that a
# resume can check each committed shard from a listing alone.
TAR_BYTES_METADATA = b"koala_batch.tar_bytes"
# File extension of an image member, by output.image_format.
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def tar_path(shard: str) -> str:
    """Where a shard's tar lives, relative to the output prefix."""
    return f"{SHARDS_DIR}/{shard}{TAR_SUFFIX}"


def manifest_path(shard: str) -> str:
    """Where a shard's manifest (its commit marker) lives, relative to the output prefix."""
    return f"{MANIFESTS_DIR}/{shard}{MANIFEST_SUFFIX}"


def image_member(key: str, image_format: str) -> str:
    """Name of an image inside its shard's tar: the key and the format's extension."""
    return f"{key}.{EXTENSIONS[image_format]}"


def sidecar_member(key: str) -> str:
    """Name of an image's metadata JSON inside its shard's tar."""
    return f"{key}.json"


class FileKind(Enum):
    """What a file under the output prefix is to koala-batch."""

    JOB_FILE = "job file"
    SUCCESS = "success marker"
    MANIFEST = "manifest"
    TAR = "tar"
    PARTIAL = "partial write"
    FOREIGN = "not written by koala-batch"


_TAR_NAME = re.compile(rf"{SHARDS_DIR}/({SHARD_NAME_PATTERN}){re.escape(TAR_SUFFIX)}")
_MANIFEST_NAME = re.compile(rf"{MANIFESTS_DIR}/({SHARD_NAME_PATTERN}){re.escape(MANIFEST_SUFFIX)}")
# storage writes a local file aside as `{target}.{hex token}.partial`, then renames it.
_PARTIAL_NAME = re.compile(
    rf"(?:{SHARDS_DIR}/{SHARD_NAME_PATTERN}{re.escape(TAR_SUFFIX)}"
    rf"|{MANIFESTS_DIR}/{SHARD_NAME_PATTERN}{re.escape(MANIFEST_SUFFIX)}"
    rf"|{re.escape(JOB_FILE)}|{re.escape(SUCCESS_FILE)})"
    rf"\.[0-9a-f]+{re.escape(PARTIAL_SUFFIX)}"
)


def classify(relative: str) -> tuple[FileKind, str | None]:
    """(kind, shard name or None) of one file, given relative to the output prefix."""
    if relative == JOB_FILE:
        return FileKind.JOB_FILE, None
    if relative == SUCCESS_FILE:
        return FileKind.SUCCESS, None
    if match := _TAR_NAME.fullmatch(relative):
        return FileKind.TAR, match.group(1)
    if match := _MANIFEST_NAME.fullmatch(relative):
        return FileKind.MANIFEST, match.group(1)
    if _PARTIAL_NAME.fullmatch(relative):
        return FileKind.PARTIAL, None
    return FileKind.FOREIGN, None


def tar_bytes_metadata(size: int) -> dict[bytes, bytes]:
    """The manifest metadata recording its tar's size."""
    return {TAR_BYTES_METADATA: str(size).encode()}


def recorded_tar_bytes(schema: pa.Schema) -> int | None:
    """The tar size a manifest records (None for manifests written before it was)."""
    value = (schema.metadata or {}).get(TAR_BYTES_METADATA)
    return int(value) if value is not None else None


@dataclass(frozen=True)
class OutputListing:
    """Every file under an output prefix, sorted into what the commit protocol sees."""

    files: tuple[str, ...]  # every file, relative to the prefix, sorted
    committed: tuple[str, ...]  # names of the committed shards (those with a manifest)
    leftovers: tuple[tuple[str, str], ...]  # (file, why it is not committed)
    foreign: tuple[str, ...]  # files koala-batch did not write
    has_job_file: bool
    has_success: bool
    sizes: dict[str, int] = field(default_factory=dict)  # bytes per file, where listed

    def shard_damage(self, shard: str, tar_bytes: int | None) -> str | None:
        """Why a committed shard cannot be trusted (its tar is missing or has another size
        than its manifest records), or None. Costs nothing beyond the listing."""
        tar = tar_path(shard)
        if tar not in self.files:
            return "its tar is missing"
        size = self.sizes.get(tar)
        if tar_bytes is not None and size is not None and size != tar_bytes:
            return f"its tar has {size} bytes, its manifest records {tar_bytes}"
        return None

    @property
    def own_files(self) -> list[str]:
        """The files koala-batch wrote (what an overwrite deletes)."""
        foreign = set(self.foreign)
        return [f for f in self.files if f not in foreign]


def scan_output(files: Iterable[str], sizes: dict[str, int] | None = None) -> OutputListing:
    """Sort relative file paths into committed shards, leftovers and foreign files."""
    files = sorted(files)
    kinds = [(relative, *classify(relative)) for relative in files]
    committed = sorted(shard for _, kind, shard in kinds if kind is FileKind.MANIFEST and shard)
    committed_set = set(committed)
    leftovers = []
    for relative, kind, shard in kinds:
        if kind is FileKind.PARTIAL:
            leftovers.append((relative, "partial write"))
        elif kind is FileKind.TAR and shard not in committed_set:
            leftovers.append((relative, "tar without a manifest: not committed"))
    return OutputListing(
        files=tuple(files),
        committed=tuple(committed),
        leftovers=tuple(leftovers),
        foreign=tuple(relative for relative, kind, _ in kinds if kind is FileKind.FOREIGN),
        has_job_file=JOB_FILE in files,
        has_success=SUCCESS_FILE in files,
        sizes=dict(sizes or {}),
    )


def list_output(storage: Storage) -> OutputListing:
    """List every file under the output prefix (retried) and sort it with `scan_output`."""
    root = storage.path("")

    def find() -> dict[str, Any]:
        try:
            return storage.fs.find(root, detail=True)
        except FileNotFoundError:
            return {}

    found = with_retries(find, f"list {storage.url('')}")
    sizes = {
        posixpath.relpath(path, root): int(info["size"])
        for path, info in found.items()
        if info.get("size") is not None
    }
    return scan_output((posixpath.relpath(path, root) for path in found), sizes)


def summary_from_manifest(storage: Storage, shard: str, manifest: pa.Table) -> dict[str, Any]:
    """The per-shard stats row (`schemas.SUMMARY_SCHEMA`) of a committed manifest."""
    statuses = manifest.column(Col.STATUS).to_pylist()
    ok = sum(1 for status in statuses if status == STATUS_OK)
    ordinals = manifest.column(Col.ORDINAL).to_pylist()
    return {
        "shard": shard,
        "tar": storage.url(tar_path(shard)),
        "manifest": storage.url(manifest_path(shard)),
        "rows": manifest.num_rows,
        "ok": ok,
        "errors": manifest.num_rows - ok,
        "image_bytes": int(sum(b for b in manifest.column(Col.BYTES).to_pylist() if b)),
        "first_ordinal": min(ordinals) if ordinals else 0,
        "committed_at": None,
        "generated_at": None,
    }
