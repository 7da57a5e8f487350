"""The output layout, and the one rule for what a listed file is.

    OUTPUT/
      _job.json                    written first: the fingerprint of what decides the images
      shards/{shard}.tar           WebDataset: {key}.{ext} + {key}.json per image
      manifests/{shard}.parquet    one row per image, failed ones included
      _SUCCESS                     written last: the job record

A shard is committed once its manifest exists: the writer puts the manifest only after
the tar is complete. A tar without a manifest, or a half-written `*.partial` file, is a
leftover of a write cut short. Anything else under the prefix is foreign: koala-batch
never wrote it, so it never deletes or trusts it. `classify` decides this for one file
and `scan_output` for a listing; commit, verify and the CLI all go through them.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import pyarrow as pa

from koala_batch.schemas import STATUS_OK, Col
from koala_batch.storage import PARTIAL_SUFFIX, Storage, with_retries

SHARDS_DIR = "shards"
MANIFESTS_DIR = "manifests"
JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS"
TAR_SUFFIX = ".tar"
MANIFEST_SUFFIX = ".parquet"
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


def classify(relative: str) -> tuple[FileKind, str | None]:
    """(kind, shard name or None) of one file, given relative to the output prefix."""
    if relative == JOB_FILE:
        return FileKind.JOB_FILE, None
    if relative == SUCCESS_FILE:
        return FileKind.SUCCESS, None
    if relative.startswith((f"{JOB_FILE}.", f"{SUCCESS_FILE}.")) and relative.endswith(
        PARTIAL_SUFFIX
    ):
        return FileKind.PARTIAL, None
    directory, _, name = relative.partition("/")
    if "/" in name or not name:
        return FileKind.FOREIGN, None
    if directory == SHARDS_DIR:
        if name.endswith(TAR_SUFFIX):
            return FileKind.TAR, name[: -len(TAR_SUFFIX)]
        if name.endswith(PARTIAL_SUFFIX):
            return FileKind.PARTIAL, None
    elif directory == MANIFESTS_DIR:
        if name.endswith(MANIFEST_SUFFIX):
            return FileKind.MANIFEST, name[: -len(MANIFEST_SUFFIX)]
        if name.endswith(PARTIAL_SUFFIX):
            return FileKind.PARTIAL, None
    return FileKind.FOREIGN, None


@dataclass(frozen=True)
class OutputListing:
    """Every file under an output prefix, sorted into what the commit protocol sees."""

    files: tuple[str, ...]  # every file, relative to the prefix, sorted
    committed: tuple[str, ...]  # names of the committed shards (those with a manifest)
    leftovers: tuple[tuple[str, str], ...]  # (file, why it is not committed)
    foreign: tuple[str, ...]  # files koala-batch did not write
    has_job_file: bool
    has_success: bool

    @property
    def own_files(self) -> list[str]:
        """The files koala-batch wrote (what an overwrite deletes)."""
        foreign = set(self.foreign)
        return [f for f in self.files if f not in foreign]


def scan_output(files: Iterable[str]) -> OutputListing:
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
    )


def list_output(storage: Storage) -> OutputListing:
    """List every file under the output prefix (retried) and sort it with `scan_output`."""
    root = storage.path("")

    def find() -> list[str]:
        try:
            return storage.fs.find(root)
        except FileNotFoundError:
            return []

    found = with_retries(find, f"list {storage.url('')}")
    return scan_output(posixpath.relpath(path, root) for path in found)


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
