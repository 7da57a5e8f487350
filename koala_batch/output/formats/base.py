"""What every output format is: the protocol each format's class implements, and the
checks their scans share."""

from __future__ import annotations

import hashlib
import io
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from koala_batch.errors import StageInputError
from koala_batch.output.layout import OutputListing, ShardRecord
from koala_batch.schemas import STATUS_OK, Col
from koala_batch.storage import Storage

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def output_url(uri: str, relative: str) -> str:
    """The URL of a path under the output at `uri`."""
    return f"{uri.rstrip('/')}/{relative}"


@dataclass(frozen=True)
class CardRecipes:
    """How the dataset card tells a reader to load this format: the code for `datasets`,
    webdataset (a paragraph, Markdown) and Ray Data, the table duckdb counts statuses in,
    and whether the card's `configs` let `load_dataset(output)` read it."""

    datasets: str
    webdataset: str
    ray: str
    duckdb_table: str
    hub_configs: bool


@dataclass(frozen=True)
class ShardToWrite:
    """A shard as the write stage hands it to its format: the manifest (every row, in
    order), each row's image (None for an error row) and the passthrough columns."""

    name: str
    manifest: pa.Table
    images: list[bytes | None]
    passthrough: list[str]

    def has_images(self) -> bool:
        """Whether any row is ok: a shard of error rows alone has no data."""
        return any(status == STATUS_OK for status in self.manifest.column(Col.STATUS).to_pylist())


@dataclass(frozen=True)
class ShardToScan:
    """What `verify` expects of a shard's data: its ok rows by member name, the webdataset
    sidecars' rows by member name, every key's status, and how many problems to list."""

    name: str
    images: dict[str, dict[str, Any]]
    sidecars: dict[str, dict[str, Any]]
    statuses: dict[str, str]
    limit: int


class OutputFormat(ABC):
    """One output format: where a shard's data live, how a shard is written, scanned by
    `verify`, read by `inspect`, and loaded as the dataset card says. A new format is a
    class of its own and one line in `formats.FORMATS`."""

    #: The name output.format gives it.
    name: str
    #: What its data file is called in messages.
    data_kind: str
    #: The glob, relative to the output, of the files a reader of this format opens.
    data_glob: str

    @abstractmethod
    def data_path(self, shard: str) -> str:
        """The file whose presence means the shard's data are there (relative path)."""

    @abstractmethod
    def write(
        self, storage: Storage, shard: ShardToWrite, check_owner: Callable[[], None]
    ) -> dict[bytes, bytes]:
        """Write the shard's data (its ok rows), calling `check_owner` right before the
        first write; the manifest metadata that records them (`layout.data_metadata`)."""

    @abstractmethod
    def damage(self, listing: OutputListing, shard: str, record: ShardRecord) -> str | None:
        """Why a committed shard with data files cannot be trusted from a listing alone (a
        data file missing, or of another size than its manifest `record`s), or None."""

    @abstractmethod
    def scan(self, storage: Storage, shard: ShardToScan) -> tuple[Problems, int]:
        """Read the shard's data once, checking each image against its manifest row and
        that nothing else is there; (problems, images decoded)."""

    @abstractmethod
    def read_images(
        self, storage: Storage, shard: str, rows: Sequence[dict[str, Any]]
    ) -> dict[str, bytes]:
        """The encoded bytes of some ok rows of one shard, by key."""

    @abstractmethod
    def card_recipes(self, uri: str) -> CardRecipes:
        """The card's loading code for an output at `uri`."""


class Problems:
    """A capped list of messages with a full count."""

    def __init__(self, limit: int):
        self.limit = max(0, limit)
        self.listed: list[str] = []
        self.total = 0

    def add(self, message: str) -> None:
        self.total += 1
        if len(self.listed) < self.limit:
            self.listed.append(message)

    def merge(self, other: Problems) -> None:
        for message in other.listed:
            self.add(message)
        self.total += other.total - len(other.listed)


def short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def check_image(
    name: str, member: str, data: bytes, row: dict[str, Any], problems: Problems
) -> bool:
    """Bytes, digest and decoded size of one image member; True when it decoded."""
    from PIL import Image

    key = row[Col.KEY]
    if len(data) != row[Col.BYTES]:
        problems.add(
            f"shard {name}: member {member} (key {key}) has {len(data)} bytes, the "
            f"manifest says {row[Col.BYTES]}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if row[Col.SHA256] and digest != row[Col.SHA256]:
        problems.add(
            f"shard {name}: member {member} (key {key}) has sha256 {digest}, the "
            f"manifest says {row[Col.SHA256]}"
        )
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            decoded_format, size = image.format, image.size
    except Exception as exc:  # noqa: BLE001 - any decode failure is the finding
        problems.add(
            f"shard {name}: member {member} (key {key}) does not decode as an image: "
            f"{type(exc).__name__}: {exc}"
        )
        return False
    if size != (row[Col.WIDTH], row[Col.HEIGHT]):
        problems.add(
            f"shard {name}: member {member} (key {key}) is {size[0]}x{size[1]}, the "
            f"manifest says {row[Col.WIDTH]}x{row[Col.HEIGHT]}"
        )
    expected_format = PIL_FORMATS.get(row[Col.IMAGE_FORMAT])
    if expected_format and decoded_format != expected_format:
        problems.add(
            f"shard {name}: member {member} (key {key}) decodes as {decoded_format}, "
            f"the manifest says {row[Col.IMAGE_FORMAT]}"
        )
    return True


def unlisted(name: str, member: str, where: str, statuses: dict[str, str]) -> str:
    """The problem of data the manifest does not list."""
    stem = member.split(".", 1)[0]
    if statuses.get(stem, STATUS_OK) != STATUS_OK:
        return f"shard {name}: member {member} belongs to error row {stem}, which has no image"
    return f"shard {name}: member {member} of {where} is not listed in the manifest"
