"""The output layout, and the one rule for what a listed file is.

    OUTPUT/
      _job.json                    written first: the fingerprint of what decides the images
      shards/                      the images, in the spec's output.format:
        {shard}.tar                  webdataset: {key}.{ext} + {key}.json per image
        {shard}.parquet              parquet: one row per image, its bytes in an `image`
                                     column (a Hugging Face Image) beside every manifest column
        {shard}/{key}.{ext}          files: one file per image, and beside them
        {shard}/metadata.parquet       the shard's ok manifest rows with a `file_name` column
                                       (what `datasets`' imagefolder reads)
      manifests/{shard}.parquet    one row per image, failed ones included: the commit marker
      README.md                    the dataset card (`card.py`), written right before _SUCCESS
      _SUCCESS                     written last: the job record
      _lease/{epoch}.json          while a run works on the output: its heartbeat (`lease.py`)

A shard is committed once its manifest exists: the writer puts the manifest only after
the shard's data (its tar, its Parquet file, or every image file and then the folder's
metadata) are complete. Data without a manifest, or a half-written `*.partial` file, is a
leftover of a write cut short. Error rows live only in the manifest, in every format.

A committed shard is never rewritten, with one exception: a retry of failed images
(`run --retry-failed`, `commit.py`) rewrites the manifest of a shard whose error rows it
generated again, without those rows (its data files stay as they are, and the manifest's
metadata records the retired rows), or uncommits the shard if none is left. Its name,
from the rows it was first written with, then no longer hashes its manifest's keys alone.

Every format's files have names of their own, so `classify` needs no spec: a listing
alone tells committed shards, leftovers and foreign files apart. The manifest records
its shard's format and data size in its Parquet metadata (`shard_record`), so a resume
checks each committed shard from a listing and its manifest, never from `_job.json`.

Ownership follows the names koala-batch writes (shard names are `keys.shard_name`'s, image
names `keys.sample_key`'s), not the folders: anything else under the prefix, a user's
`shards/backup.tar` or `shards/{shard}/notes.txt` included, is foreign, so it is never
deleted or trusted.
`classify` decides this for one file and `scan_output` for a listing; commit, verify and
the CLI all go through them.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import Any

import pyarrow as pa

from koala_batch.keys import SHARD_NAME_PATTERN
from koala_batch.output.stats import failures_by_reason
from koala_batch.schemas import STATUS_OK, Col
from koala_batch.storage import PARTIAL_SUFFIX, Storage, with_retries

SHARDS_DIR = "shards"
MANIFESTS_DIR = "manifests"
JOB_FILE = "_job.json"
SUCCESS_FILE = "_SUCCESS"
# Held by the run working on the output (`lease.py`): one file per holder, numbered.
LEASE_DIR = "_lease"
# koala-batch owns OUTPUT/README.md: overwrite deletes it, each successful run rewrites it.
CARD_FILE = "README.md"
TAR_SUFFIX = ".tar"
MANIFEST_SUFFIX = ".parquet"
# Manifest metadata: the shard's stats (`stats.shard_stats`) as JSON, so that a reader of
# a committed output finds them without the job record.
STATS_METADATA = b"koala_batch.output.stats"
# File extension of an image member, by output.image_format.
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}

# output.format values (config.OutputSpec.format).
WEBDATASET = "webdataset"
PARQUET = "parquet"
FILES = "files"
OUTPUT_FORMATS = (WEBDATASET, PARQUET, FILES)
PARQUET_SUFFIX = ".parquet"
# The files format's per-shard table of its images, named as `datasets`' imagefolder
# looks for it.
FOLDER_METADATA = "metadata.parquet"
# Manifest (Parquet key-value) metadata: the shard's output.format, and the byte size of
# its data file (the tar, the Parquet file, the folder's metadata.parquet), so that a
# resume can check each committed shard from a listing alone.
FORMAT_METADATA = b"koala_batch.format"
DATA_BYTES_METADATA = b"koala_batch.data_bytes"
# The `image` column of a parquet shard: the Arrow storage of a Hugging Face Image.
IMAGE_COLUMN = "image"
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
# The column naming each image file in a folder's metadata.parquet (imagefolder's name).
FILE_NAME_COLUMN = "file_name"
# Parquet metadata key under which Hugging Face `datasets` keeps a table's features.
HUGGINGFACE_METADATA = b"huggingface"


def tar_path(shard: str) -> str:
    """Where a shard's tar lives, relative to the output prefix."""
    return f"{SHARDS_DIR}/{shard}{TAR_SUFFIX}"


def parquet_path(shard: str) -> str:
    """Where a parquet-format shard's data file lives, relative to the output prefix."""
    return f"{SHARDS_DIR}/{shard}{PARQUET_SUFFIX}"


def shard_folder(shard: str) -> str:
    """The folder of a files-format shard, relative to the output prefix."""
    return f"{SHARDS_DIR}/{shard}"


def folder_file_path(shard: str, name: str) -> str:
    """Where a file of a files-format shard (an image member or its metadata) lives."""
    return f"{shard_folder(shard)}/{name}"


def data_location(shard: str, output_format: str) -> str:
    """The shard's data: its tar, its Parquet file or its folder."""
    if output_format == PARQUET:
        return parquet_path(shard)
    if output_format == FILES:
        return shard_folder(shard)
    return tar_path(shard)


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
    CARD = "dataset card"
    LEASE = "run lease"
    MANIFEST = "manifest"
    TAR = "tar"
    PARQUET_SHARD = "parquet shard"
    FOLDER_FILE = "shard folder file"  # files format: an image or the folder's metadata
    PARTIAL = "partial write"
    FOREIGN = "not written by koala-batch"


# The kinds that hold a shard's data (committed once the shard's manifest exists).
DATA_KINDS = frozenset({FileKind.TAR, FileKind.PARQUET_SHARD, FileKind.FOLDER_FILE})


_TAR_NAME = re.compile(rf"{SHARDS_DIR}/({SHARD_NAME_PATTERN}){re.escape(TAR_SUFFIX)}")
_LEASE_NAME = re.compile(rf"{LEASE_DIR}/\d{{12}}\.json")
_MANIFEST_NAME = re.compile(rf"{MANIFESTS_DIR}/({SHARD_NAME_PATTERN}){re.escape(MANIFEST_SUFFIX)}")
_PARQUET_NAME = re.compile(rf"{SHARDS_DIR}/({SHARD_NAME_PATTERN}){re.escape(PARQUET_SUFFIX)}")
# What `keys.sample_key` returns, with an image extension: a files-format image member.
_MEMBER_PATTERN = rf"[0-9a-f]{{32}}-\d+\.(?:{'|'.join(sorted(set(EXTENSIONS.values())))})"
_FOLDER_FILE_PATTERN = rf"(?:{_MEMBER_PATTERN}|{re.escape(FOLDER_METADATA)})"
_FOLDER_FILE_NAME = re.compile(rf"{SHARDS_DIR}/({SHARD_NAME_PATTERN})/{_FOLDER_FILE_PATTERN}")
# storage writes a local file aside as `{target}.{hex token}.partial`, then renames it.
_PARTIAL_NAME = re.compile(
    rf"(?:{SHARDS_DIR}/{SHARD_NAME_PATTERN}{re.escape(TAR_SUFFIX)}"
    rf"|{SHARDS_DIR}/{SHARD_NAME_PATTERN}{re.escape(PARQUET_SUFFIX)}"
    rf"|{SHARDS_DIR}/{SHARD_NAME_PATTERN}/{_FOLDER_FILE_PATTERN}"
    rf"|{MANIFESTS_DIR}/{SHARD_NAME_PATTERN}{re.escape(MANIFEST_SUFFIX)}"
    rf"|{re.escape(JOB_FILE)}|{re.escape(SUCCESS_FILE)}|{re.escape(CARD_FILE)}"
    rf"|{LEASE_DIR}/\d{{12}}\.json)"
    rf"\.[0-9a-f]+{re.escape(PARTIAL_SUFFIX)}"
)


def classify(relative: str) -> tuple[FileKind, str | None]:
    """(kind, shard name or None) of one file, given relative to the output prefix."""
    if relative == JOB_FILE:
        return FileKind.JOB_FILE, None
    if relative == SUCCESS_FILE:
        return FileKind.SUCCESS, None
    if relative == CARD_FILE:
        return FileKind.CARD, None
    if _LEASE_NAME.fullmatch(relative):
        return FileKind.LEASE, None
    if match := _TAR_NAME.fullmatch(relative):
        return FileKind.TAR, match.group(1)
    if match := _PARQUET_NAME.fullmatch(relative):
        return FileKind.PARQUET_SHARD, match.group(1)
    if match := _FOLDER_FILE_NAME.fullmatch(relative):
        return FileKind.FOLDER_FILE, match.group(1)
    if match := _MANIFEST_NAME.fullmatch(relative):
        return FileKind.MANIFEST, match.group(1)
    if _PARTIAL_NAME.fullmatch(relative):
        return FileKind.PARTIAL, None
    return FileKind.FOREIGN, None


_ASIDE_TOKEN = re.compile(rf"\.[0-9a-f]+{re.escape(PARTIAL_SUFFIX)}$")


def written_aside_for(relative: str) -> str | None:
    """The file a write-aside partial (`{target}.{hex}.partial`, see `storage`) stands in
    for, or None when `relative` is no such partial."""
    if classify(relative)[0] is not FileKind.PARTIAL:
        return None
    return _ASIDE_TOKEN.sub("", relative)


def is_claim_file(relative: str) -> bool:
    """Whether a file is one that runs starting on an output write before any job is in
    it: a lease, or a write-aside of a lease or of `_job.json` (a lease being created by a
    run racing for it, a probe, a write cut short)."""
    target = written_aside_for(relative)
    if target == JOB_FILE:
        return True
    return classify(target or relative)[0] is FileKind.LEASE


def stats_metadata(stats: dict[str, Any]) -> dict[bytes, bytes]:
    """The manifest metadata recording its shard's stats."""
    return {STATS_METADATA: json.dumps(stats).encode()}


def recorded_stats(schema: pa.Schema) -> dict[str, Any] | None:
    """The shard stats a manifest records (None for manifests written before they were)."""
    value = (schema.metadata or {}).get(STATS_METADATA)
    return json.loads(value) if value is not None else None


def data_metadata(output_format: str, data_bytes: int) -> dict[bytes, bytes]:
    """The manifest metadata recording its shard's format and the size of its data file
    (the tar, the Parquet file, or the folder's metadata.parquet)."""
    return {FORMAT_METADATA: output_format.encode(), DATA_BYTES_METADATA: str(data_bytes).encode()}


def recorded_data_bytes(schema: pa.Schema) -> int | None:
    """The size of the data file a manifest records (None: not recorded)."""
    value = (schema.metadata or {}).get(DATA_BYTES_METADATA)
    return int(value) if value is not None else None


def recorded_format(schema: pa.Schema) -> str | None:
    """The output.format a manifest records (None: none, so not a manifest koala-batch
    wrote for this job-file format)."""
    value = (schema.metadata or {}).get(FORMAT_METADATA)
    return value.decode() if value is not None else None


@dataclass(frozen=True)
class ShardRecord:
    """What a committed manifest says its shard's data are: enough to check them against a
    listing (`formats.shard_damage`)."""

    output_format: str | None  # None: not recorded (`formats.shard_damage` says so)
    data_bytes: int | None  # size of the tar / Parquet file / folder metadata, if recorded
    members: dict[str, int] = field(default_factory=dict)  # files: image name -> bytes

    @property
    def has_data_file(self) -> bool:
        """Whether the shard has a data file. A parquet or files shard of error rows only
        has none (its manifest records 0 bytes): Hugging Face `datasets` fails on a Parquet
        file of no rows, and there is no image to hold. A webdataset shard always has its
        tar, empty or not."""
        return not (self.output_format in (PARQUET, FILES) and self.data_bytes == 0)


def shard_record(manifest: pa.Table) -> ShardRecord:
    """The `ShardRecord` of a manifest table: its metadata, and for the files format the
    member and byte count of each ok row (the table must hold member, bytes and status)."""
    output_format = recorded_format(manifest.schema)
    members: dict[str, int] = {}
    if output_format == FILES:
        columns = [manifest.column(c).to_pylist() for c in (Col.MEMBER, Col.BYTES, Col.STATUS)]
        members = {
            member: size
            for member, size, status in zip(*columns, strict=True)
            if status == STATUS_OK and member is not None
        }
    return ShardRecord(output_format, recorded_data_bytes(manifest.schema), members)


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
    leases: tuple[str, ...] = ()  # the run lease's files (`lease.py`), if a run holds it

    @cached_property
    def file_set(self) -> frozenset[str]:
        """`files` as a set, for lookups."""
        return frozenset(self.files)

    def size_damage(self, what: str, relative: str, recorded: int | None) -> str | None:
        """Why one data file of a shard cannot be trusted from the listing (it is missing,
        or has another size than the `recorded` one), or None."""
        if relative not in self.file_set:
            return f"its {what} {relative} is missing"
        size = self.sizes.get(relative)
        if recorded is not None and size is not None and size != recorded:
            return f"its {what} {relative} has {size} bytes, its manifest records {recorded}"
        return None

    def shard_file_sizes(self) -> dict[str, int | None]:
        """The size of every file of a shard (manifests and data), by path: all that the
        committed state read from this listing depends on."""
        return {f: self.sizes.get(f) for f in self.files if classify(f)[1] is not None}

    @property
    def own_files(self) -> list[str]:
        """The files koala-batch wrote (what an overwrite deletes), but the run lease's:
        it belongs to the run working on the output, which releases it itself."""
        kept = set(self.foreign) | set(self.leases)
        return [f for f in self.files if f not in kept]


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
        elif kind in DATA_KINDS and shard not in committed_set:
            leftovers.append((relative, f"{kind.value} without a manifest: not committed"))
    return OutputListing(
        files=tuple(files),
        committed=tuple(committed),
        leftovers=tuple(leftovers),
        foreign=tuple(relative for relative, kind, _ in kinds if kind is FileKind.FOREIGN),
        has_job_file=JOB_FILE in files,
        has_success=SUCCESS_FILE in files,
        sizes=dict(sizes or {}),
        leases=tuple(relative for relative, kind, _ in kinds if kind is FileKind.LEASE),
    )


def list_output(storage: Storage) -> OutputListing:
    """List every file under the output prefix (retried) and sort it with `scan_output`."""
    root = storage.path("")
    storage.forget_listings()

    def find() -> dict[str, Any]:
        try:
            return storage.fs.find(root, detail=True)
        except FileNotFoundError:
            return {}

    found = with_retries(find, f"list {storage.url('')}")
    # s3fs answers a listing that found nothing with the prefix's own info, which is a
    # directory when another writer's object appeared in between: not a file of the output.
    found = {path: info for path, info in found.items() if info.get("type") != "directory"}
    sizes = {
        posixpath.relpath(path, root): int(info["size"])
        for path, info in found.items()
        if info.get("size") is not None
    }
    return scan_output((posixpath.relpath(path, root) for path in found), sizes)


def shard_data_files(storage: Storage, shard: str) -> list[str]:
    """Every data file a shard may have, in any format (what uncommitting it removes)."""
    folder = shard_folder(shard)
    in_folder = [
        f"{folder}/{name}"
        for name in storage.list_files(folder)
        if classify(f"{folder}/{name}")[0] in (FileKind.FOLDER_FILE, FileKind.PARTIAL)
    ]
    # The folder's metadata goes first: without it a reader sees no shard there.
    in_folder.sort(key=lambda relative: not relative.endswith(f"/{FOLDER_METADATA}"))
    return [tar_path(shard), parquet_path(shard), *in_folder]


def summary_from_manifest(storage: Storage, shard: str, manifest: pa.Table) -> dict[str, Any]:
    """The per-shard stats row (`schemas.SUMMARY_SCHEMA`) of a committed manifest.

    Failures, seconds and generation moments come from the stats the manifest records;
    a manifest written before them gives its failures from the error column (if read)."""
    statuses = manifest.column(Col.STATUS).to_pylist()
    ok = sum(1 for status in statuses if status == STATUS_OK)
    ordinals = manifest.column(Col.ORDINAL).to_pylist()
    stats = recorded_stats(manifest.schema) or {}
    failures = stats.get("failures")
    if failures is None and Col.ERROR in manifest.column_names:
        failures = failures_by_reason(
            error
            for status, error in zip(statuses, manifest.column(Col.ERROR).to_pylist(), strict=True)
            if status != STATUS_OK
        )
    return {
        "shard": shard,
        # The shard's data in its format (the field keeps its name from when it was a tar).
        "tar": storage.url(data_location(shard, recorded_format(manifest.schema) or WEBDATASET)),
        "manifest": storage.url(manifest_path(shard)),
        "rows": manifest.num_rows,
        "ok": ok,
        "errors": manifest.num_rows - ok,
        "image_bytes": int(sum(b for b in manifest.column(Col.BYTES).to_pylist() if b)),
        "first_ordinal": min(ordinals) if ordinals else 0,
        "committed_at": None,
        "generated_at": None,
        # (reason, count) pairs: what the summary schema's map column gives back, so that
        # a row read from a manifest equals the one its writer returned
        "failures": list(failures.items()) if failures is not None else None,
        "generate_s": stats.get("generate_s"),
        "encode_s": stats.get("encode_s"),
        "first_generated_at": stats.get("first_generated_at"),
        "last_generated_at": stats.get("last_generated_at"),
    }
