"""The files format: a shard is a folder of image files and its metadata.parquet (its ok
rows, `file_name` first), as `datasets`' imagefolder reads them."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
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
    unlisted,
)
from koala_batch.output.layout import (
    FILE_NAME_COLUMN,
    FILES,
    FOLDER_METADATA,
    MANIFESTS_DIR,
    SHARDS_DIR,
    FileKind,
    OutputListing,
    ShardRecord,
    classify,
    data_metadata,
    folder_file_path,
    shard_folder,
)
from koala_batch.schemas import Col
from koala_batch.storage import Storage

# Concurrent uploads of one files-format shard's images (object stores take many at once).
FILE_UPLOAD_THREADS = 8


class ImageFiles(OutputFormat):
    """Shards as folders of image files: `shards/{shard}/{key}.{ext}` and the folder's
    metadata.parquet, written last."""

    name = FILES
    data_kind = "metadata file"
    data_glob = f"{SHARDS_DIR}/**"

    def data_path(self, shard: str) -> str:
        # The folder's metadata: the file whose absence means the folder's is missing.
        return folder_file_path(shard, FOLDER_METADATA)

    def damage(self, listing: OutputListing, shard: str, record: ShardRecord) -> str | None:
        metadata = folder_file_path(shard, FOLDER_METADATA)
        damage = listing.size_damage("metadata file", metadata, record.data_bytes)
        for member, size in sorted(record.members.items()):
            if damage is not None:
                break
            damage = listing.size_damage("image", folder_file_path(shard, member), size)
        return damage

    def write(
        self, storage: Storage, shard: ShardToWrite, check_owner: Callable[[], None]
    ) -> dict[bytes, bytes]:
        if not shard.has_images():
            check_owner()
            return data_metadata(FILES, 0)  # no folder: `ShardRecord.has_data_file`
        rows, kept = ok_rows(shard.manifest, shard.images)
        metadata = folder_metadata(rows)
        members = rows.column(Col.MEMBER).to_pylist()
        paths = [folder_file_path(shard.name, member) for member in members]
        check_owner()
        with ThreadPoolExecutor(max_workers=FILE_UPLOAD_THREADS) as pool:
            list(pool.map(storage.write_bytes, paths, kept))
        # Last, so a folder with its metadata file holds every image it lists.
        storage.write_bytes(folder_file_path(shard.name, FOLDER_METADATA), metadata)
        return data_metadata(FILES, len(metadata))

    def scan(self, storage: Storage, shard: ShardToScan) -> tuple[Problems, int]:
        return scan_folder(storage, shard)

    def read_images(
        self, storage: Storage, shard: str, rows: Sequence[dict[str, Any]]
    ) -> dict[str, bytes]:
        return {
            row[Col.KEY]: storage.read_bytes(folder_file_path(shard, row[Col.MEMBER]))
            for row in rows
        }

    def card_recipes(self, uri: str) -> CardRecipes:
        shards = output_url(uri, SHARDS_DIR)
        manifests = output_url(uri, f"{MANIFESTS_DIR}/*.parquet")
        return CardRecipes(
            datasets=f'ds = load_dataset("imagefolder", data_dir="{shards}", split="train")',
            webdataset=(
                "Not for this format: the images are plain files "
                "(`output.format: webdataset` writes tars)."
            ),
            ray=(
                f'images = ray.data.read_images("{shards}/", include_paths=True)\n'
                f'rows = ray.data.read_parquet("{output_url(uri, MANIFESTS_DIR)}/")'
            ),
            duckdb_table=manifests,
            hub_configs=False,
        )


def folder_metadata(rows: pa.Table) -> bytes:
    """A files-format shard's metadata.parquet: its ok manifest rows (`ok_rows`),
    `file_name` (the image's name in the folder, as `datasets`' imagefolder reads it) first."""
    rows = rows.replace_schema_metadata(None)
    table = rows.add_column(0, pa.field(FILE_NAME_COLUMN, pa.string()), rows.column(Col.MEMBER))
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def scan_folder(storage: Storage, shard: ShardToScan) -> tuple[Problems, int]:
    """Read every image of a files-format shard and its metadata.parquet; (problems,
    images decoded)."""
    name, images, statuses = shard.name, shard.images, shard.statuses
    problems = Problems(shard.limit)
    decoded = 0
    folder = shard_folder(name)
    present = set(storage.list_files(folder))
    for member, row in images.items():
        path = folder_file_path(name, member)
        if member not in present:
            problems.add(f"shard {name}: key {row[Col.KEY]}: image {path} is missing")
            continue
        decoded += check_image(name, path, storage.read_bytes(path), row, problems)
    for member in sorted(present - set(images) - {FOLDER_METADATA}):
        # Half-written files are leftovers and a user's own files foreign: both reported
        # from the listing, neither the shard's.
        if classify(folder_file_path(name, member))[0] is FileKind.FOLDER_FILE:
            problems.add(unlisted(name, member, f"{folder}/", statuses))
    metadata_path = folder_file_path(name, FOLDER_METADATA)
    metadata = pq.read_table(io.BytesIO(storage.read_bytes(metadata_path)))
    if FILE_NAME_COLUMN not in metadata.column_names or Col.KEY not in metadata.column_names:
        problems.add(
            f"shard {name}: {metadata_path} lacks a {FILE_NAME_COLUMN} or {Col.KEY} column"
        )
        return problems, decoded
    listed = metadata.column(FILE_NAME_COLUMN).to_pylist()
    keys = metadata.column(Col.KEY).to_pylist()
    for member, key in zip(listed, keys, strict=True):
        if member not in images:
            problems.add(unlisted(name, str(member), metadata_path, statuses))
        elif key != images[member][Col.KEY]:
            problems.add(
                f"shard {name}: {metadata_path} lists {member} with key {key}, the manifest "
                f"says {images[member][Col.KEY]}"
            )
    if len(set(listed)) != len(listed):
        problems.add(f"shard {name}: {metadata_path} lists an image more than once")
    for member in sorted(set(images) - set(listed)):
        problems.add(
            f"shard {name}: key {images[member][Col.KEY]}: {metadata_path} does not list {member}"
        )
    return problems, decoded
