"""The webdataset format: a shard is a tar of `{key}.{ext}` images, each with its
`{key}.json` row."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from koala_batch.errors import StageInputError
from koala_batch.output.formats.base import (
    CardRecipes,
    OutputFormat,
    Problems,
    ShardToScan,
    ShardToWrite,
    check_image,
    output_url,
    short,
)
from koala_batch.output.layout import (
    MANIFESTS_DIR,
    SHARDS_DIR,
    WEBDATASET,
    OutputListing,
    ShardRecord,
    data_metadata,
    sidecar_member,
    tar_path,
)
from koala_batch.schemas import SIDECAR_COLUMNS, STATUS_OK, Col
from koala_batch.storage import Storage


class WebDataset(OutputFormat):
    """Shards as WebDataset tars: `shards/{shard}.tar`."""

    name = WEBDATASET
    data_kind = "tar"
    data_glob = f"{SHARDS_DIR}/*.tar"

    def data_path(self, shard: str) -> str:
        return tar_path(shard)

    def damage(self, listing: OutputListing, shard: str, record: ShardRecord) -> str | None:
        tar = tar_path(shard)
        if tar not in listing.file_set:
            return "its tar is missing"
        size = listing.sizes.get(tar)
        if record.data_bytes is not None and size is not None and size != record.data_bytes:
            return f"its tar has {size} bytes, its manifest records {record.data_bytes}"
        return None

    def write(
        self, storage: Storage, shard: ShardToWrite, check_owner: Callable[[], None]
    ) -> dict[bytes, bytes]:
        with tempfile.TemporaryDirectory(prefix="koala-shard-") as scratch:
            local = os.path.join(scratch, f"{shard.name}.tar")
            write_tar(shard.manifest, shard.images, shard.passthrough, local)
            recorded = data_metadata(WEBDATASET, os.path.getsize(local))
            check_owner()
            storage.upload_file(local, tar_path(shard.name))
        return recorded

    def scan(self, storage: Storage, shard: ShardToScan) -> tuple[Problems, int]:
        return scan_tar(storage, shard)

    def read_images(
        self, storage: Storage, shard: str, rows: Sequence[dict[str, Any]]
    ) -> dict[str, bytes]:
        members = {row[Col.MEMBER]: row[Col.KEY] for row in rows}
        found: dict[str, bytes] = {}
        with (
            storage.open_read(tar_path(shard)) as handle,
            tarfile.open(fileobj=handle, mode="r:") as archive,
        ):
            for info in archive:
                if info.name in members:
                    extracted = archive.extractfile(info)
                    if extracted is not None:
                        found[members[info.name]] = extracted.read()
                    if len(found) == len(members):
                        break
        return found

    def card_recipes(self, uri: str) -> CardRecipes:
        shards = output_url(uri, SHARDS_DIR)
        files = output_url(uri, self.data_glob)
        manifests = output_url(uri, f"{MANIFESTS_DIR}/*.parquet")
        if "://" in uri:
            listing = (
                "import fsspec\n"
                "import webdataset as wds\n\n"
                f'fs, root = fsspec.core.url_to_fs("{shards}")\n'
                "# webdataset streams remote tars through a command, e.g. the AWS CLI for s3://\n"
                'urls = [f"pipe:aws s3 cp s3://{path} -" for path in sorted(fs.glob(root + '
                '"/*.tar"))]\n'
            )
        else:
            listing = (
                f'import glob\nimport webdataset as wds\n\nurls = sorted(glob.glob("{files}"))\n'
            )
        return CardRecipes(
            datasets=f'ds = load_dataset("webdataset", data_files="{files}", split="train")',
            webdataset=(
                "```python\n"
                f"{listing}"
                'ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple('
                '"__key__", "json")\n'
                "```\n\n"
                "Each sample is an image (`{key}.png`, `.jpg` or `.webp`) and its row "
                "(`{key}.json`)."
            ),
            ray=f'ds = ray.data.read_webdataset("{shards}/")',
            duckdb_table=manifests,
            hub_configs=True,
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


def write_tar(
    manifest: pa.Table, images: list[bytes | None], passthrough: list[str], local_path: str
) -> None:
    """The shard's tar at `local_path`: each ok row's image and its `{key}.json` row, in
    manifest order, with fixed member metadata (the same rows give the same bytes)."""
    rows = manifest.to_pylist()
    with tarfile.open(local_path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for row, image in zip(rows, images, strict=True):
            if row[Col.STATUS] != STATUS_OK:
                continue
            if image is None:
                raise StageInputError(f"write stage: ok row {row[Col.KEY]} has no image")
            _add_member(archive, row[Col.MEMBER], image)
            _add_member(archive, sidecar_member(row[Col.KEY]), sample_metadata(row, passthrough))


def check_sidecar(
    name: str, member: str, data: bytes, row: dict[str, Any], problems: Problems
) -> None:
    try:
        record = json.loads(data)
    except ValueError as exc:
        problems.add(f"shard {name}: sidecar {member} is not valid JSON: {exc}")
        return
    if not isinstance(record, dict):
        problems.add(f"shard {name}: sidecar {member} is not a JSON object")
        return
    for column in (Col.KEY, Col.ID, Col.IMAGE_INDEX):
        if record.get(column) != row[column]:
            problems.add(
                f"shard {name}: sidecar {member} has {column}="
                f"{short(record.get(column))}, the manifest says {short(row[column])}"
            )


def scan_tar(storage: Storage, shard: ShardToScan) -> tuple[Problems, int]:
    """Stream the tar once, checking every member; (problems, images decoded)."""
    name, images, statuses = shard.name, shard.images, shard.statuses
    sidecars = shard.sidecars
    problems = Problems(shard.limit)
    decoded = 0
    seen: Counter[str] = Counter()
    with (
        storage.open_read(tar_path(name)) as handle,
        tarfile.open(fileobj=handle, mode="r|") as archive,
    ):
        for info in archive:
            member = info.name
            seen[member] += 1
            if seen[member] == 2:
                problems.add(
                    f"shard {name}: member {member} appears more than once in {tar_path(name)}"
                )
            if seen[member] > 1:
                continue
            if not info.isfile():
                problems.add(
                    f"shard {name}: member {member} of {tar_path(name)} is not a regular file"
                )
                continue
            extracted = archive.extractfile(info)
            data = extracted.read() if extracted is not None else b""
            if member in images:
                decoded += check_image(name, member, data, images[member], problems)
            elif member in sidecars:
                check_sidecar(name, member, data, sidecars[member], problems)
            else:
                stem = member.split(".", 1)[0]
                if statuses.get(stem, STATUS_OK) != STATUS_OK:
                    problems.add(
                        f"shard {name}: member {member} belongs to error row {stem}, "
                        "which has no image"
                    )
                else:
                    problems.add(
                        f"shard {name}: member {member} of {tar_path(name)} is not "
                        "listed in the manifest"
                    )
    for member, row in images.items():
        if not seen[member]:
            problems.add(
                f"shard {name}: key {row[Col.KEY]}: member {member} is missing from "
                f"{tar_path(name)}"
            )
    for member, row in sidecars.items():
        if not seen[member]:
            problems.add(
                f"shard {name}: key {row[Col.KEY]}: sidecar {member} is missing from "
                f"{tar_path(name)}"
            )
    return problems, decoded
