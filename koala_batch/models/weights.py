"""Weights where the cluster can reach them: fetched copies and the per-node cache.

`fetch_model` copies a preset, a Hugging Face id or a local diffusers directory to a local
folder or an object-storage prefix: `model_index.json`, each component's configs and
tokenizer files and its safetensors weights, never pickle weights. Beside them goes
`koala-batch-weights.json`, every file's path, size and sha256 and where the copy came
from, written last: its presence marks a complete copy, as a shard's manifest marks a
committed shard.

With such a prefix as `model.name`, `local_copy` downloads it once per node into the
koala-batch cache (a file lock among the node's actors, every checksum verified, one
atomic rename) and every actor loads the local directory, the Hub never asked.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from koala_batch.errors import ModelUnavailableError
from koala_batch.models.loading import check_local_weights_are_safetensors
from koala_batch.models.tiny import TINY_MODEL_VERSION, default_cache_dir, ensure_tiny_model
from koala_batch.presets import (
    LOCAL_PROTOCOLS,
    PRESETS,
    TINY_MODEL_NAME,
    check_model_name,
    local_model_path,
    unknown_model_error,
)
from koala_batch.storage import Storage, WriteTarget

logger = logging.getLogger(__name__)

MANIFEST_NAME = "koala-batch-weights.json"
MANIFEST_FORMAT = "koala-batch-weights/1"
MODEL_INDEX = "model_index.json"
WEIGHT_SUFFIX = ".safetensors"
# Configs, weight-shard indexes and tokenizer vocabularies (vocab.json, merges.txt).
CONFIG_SUFFIXES = (".json", ".txt")
# The folder of the koala-batch cache that holds downloaded copies, one per manifest.
CACHE_FOLDER = "models"
_HASH_CHUNK = 8 * 2**20
# A safetensors file: an 8-byte little-endian header length, the JSON header, then the
# tensors' bytes, each at the header's `data_offsets` (from the end of the header).
SAFETENSORS_LENGTH_BYTES = 8
# The safetensors library refuses a longer header: a length beyond it is damage.
SAFETENSORS_MAX_HEADER = 100_000_000
# How messages name fetch-model's destination and the settings that fix it.
FETCH_DESTINATION = WriteTarget(
    noun="destination",
    uri_setting="dest",
    options_setting="the storage credentials in the environment (AWS_*)",
    endpoint_setting="FSSPEC_S3_ENDPOINT_URL",
)


@dataclass(frozen=True)
class WeightFile:
    """One file of a fetched copy, by its path relative to the copy's root."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class WeightsManifest:
    """What a fetched copy holds (`files`) and where it came from (`source`)."""

    source: dict[str, Any]
    files: tuple[WeightFile, ...]

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files)

    def to_bytes(self) -> bytes:
        document = {
            "format": MANIFEST_FORMAT,
            "source": self.source,
            "total_size": self.total_size,
            "files": [vars(entry) for entry in self.files],
        }
        return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> WeightsManifest:
        """Parse a manifest; ValueError says what is wrong with it."""
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"its format is not {MANIFEST_FORMAT}")
        files = []
        for entry in document.get("files", []):
            path, size, sha256 = entry["path"], entry["size"], entry["sha256"]
            # Paths come from storage: one leaving the copy's root is never written locally.
            if (
                not isinstance(path, str)
                or path.startswith("/")
                or posixpath.normpath(path) != path
                or path.split("/")[0] == ".."
            ):
                raise ValueError(f"file path {path!r} is not a plain relative path")
            if not isinstance(size, int) or not isinstance(sha256, str) or len(sha256) != 64:
                raise ValueError(f"the entry of {path} has no integer size and sha256")
            files.append(WeightFile(path, size, sha256))
        if not any(entry.path == MODEL_INDEX for entry in files):
            raise ValueError(f"it lists no {MODEL_INDEX}")
        return cls(source=dict(document.get("source") or {}), files=tuple(files))


@dataclass(frozen=True)
class FetchResult:
    """What `fetch_model` did: the copy's URL, its files and bytes, and how many it copied
    (the rest were there already, unchanged)."""

    url: str
    files: int
    total_size: int
    copied: int


def is_remote_model(name: str) -> bool:
    """Whether model.name is an fsspec URL of a fetched copy (s3://, gs://, memory://, ...)."""
    protocol, _ = fsspec.core.split_protocol(name)
    return protocol is not None and protocol not in LOCAL_PROTOCOLS


def safetensors_damage(path: Path) -> str | None:
    """Why a safetensors file cannot be whole, or None: its header does not parse, or the
    file's size is not where the header's last tensor ends (a truncated copy). Reads the
    header alone, not the tensors: cheap enough for every preflight."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(SAFETENSORS_LENGTH_BYTES), "little")
            if size < SAFETENSORS_LENGTH_BYTES or length > min(
                size - SAFETENSORS_LENGTH_BYTES, SAFETENSORS_MAX_HEADER
            ):
                return f"{size} bytes, too short for the header it announces"
            header = json.loads(handle.read(length))
        ends = [
            int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"
        ]
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "its header is not a safetensors header"
    expected = SAFETENSORS_LENGTH_BYTES + length + max(ends, default=0)
    if size != expected:
        return f"{size} bytes where its header's tensors end at byte {expected}"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split()) or 'no detail'}"


# ---------------------------------------------------------------------------------------
# Fetching


def is_selected_weight(file_name: str, variant: str | None) -> bool:
    """Whether a safetensors file holds the weights of `variant` (None: the plain ones).

    diffusers names a variant's weights `NAME.VARIANT.safetensors`, sharded
    `NAME.VARIANT-00001-of-00002.safetensors`; plain weights have no dot in their stem.
    """
    if not file_name.endswith(WEIGHT_SUFFIX):
        return False
    stem = file_name[: -len(WEIGHT_SUFFIX)]
    if variant is None:
        return "." not in stem
    return stem.endswith(f".{variant}") or f".{variant}-" in stem


def select_files(directory: Path, name: str, variant: str | None) -> list[str]:
    """The files of a diffusers directory that a fetched copy holds, as relative paths.

    Raises UnsafeWeightsError for a component with pickle weights only, and
    ModelUnavailableError for a model component without safetensors weights of `variant`.
    """
    index_path = directory / MODEL_INDEX
    if not index_path.is_file():
        raise ModelUnavailableError(
            f"model {name}: {directory} has no {MODEL_INDEX}, so it is not a diffusers "
            "pipeline directory; save one with `pipeline.save_pretrained(DIR)`"
        )
    check_local_weights_are_safetensors(directory)
    index = json.loads(index_path.read_text())
    selected = [MODEL_INDEX]
    lacking = []
    for component, value in sorted(index.items()):
        folder = directory / component
        if not (isinstance(value, list) and value and value[0] is not None and folder.is_dir()):
            continue
        files = sorted(p.name for p in folder.iterdir() if p.is_file())
        configs = [
            f for f in files if f.endswith(CONFIG_SUFFIXES) and ".bin.index" not in f
        ]  # a pickle shard index names files that are never copied
        weights = [f for f in files if is_selected_weight(f, variant)]
        if "config.json" in files and not weights:  # a model; tokenizers and schedulers hold none
            lacking.append(component)
        selected += [f"{component}/{f}" for f in configs + weights]
    if lacking:
        wanted = f"{variant} " if variant else ""
        raise ModelUnavailableError(
            f"model {name}: {directory} has no {wanted}safetensors weights for "
            f"{', '.join(lacking)}; koala-batch copies safetensors only"
            + ("; check --variant" if variant else "")
        )
    return selected


def hub_snapshot(name: str, repo_id: str, revision: str | None, variant: str | None) -> Path:
    """A Hub repository's configs and safetensors weights in the local Hugging Face cache.

    Downloads what is missing; with HF_HUB_OFFLINE=1 it answers from the cache alone.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if variant:
        weights = [f"*.{variant}{WEIGHT_SUFFIX}", f"*.{variant}-*{WEIGHT_SUFFIX}"]
        ignore = None
    else:
        weights = [f"*{WEIGHT_SUFFIX}"]
        ignore = [f"*.*{WEIGHT_SUFFIX}"]  # every variant's weights: see is_selected_weight
    at = f"{repo_id}@{revision}" if revision else repo_id
    label = name if at == name else f"{name} ({at})"
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=[f"*{suffix}" for suffix in CONFIG_SUFFIXES] + weights,
            ignore_patterns=ignore,
        )
    except HFValidationError:
        raise unknown_model_error(name, "model") from None
    except GatedRepoError:
        raise ModelUnavailableError(
            f"model {label} is gated on the Hub: accept its terms there and set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise ModelUnavailableError(
            f"model {name}: the Hub has {repo_id} but no revision {revision!r}; check --revision"
        ) from None
    except RepositoryNotFoundError:
        raise ModelUnavailableError(
            f"model {name}: the Hub has no repository {repo_id} (a private one needs HF_TOKEN); "
            f"presets: {', '.join(PRESETS)}"
        ) from None
    except (LocalEntryNotFoundError, OSError) as exc:
        # Offline, or the Hub unreachable, and not (wholly) in the cache; or a download failed.
        offline = " (HF_HUB_OFFLINE is set)" if constants.is_offline_mode() else ""
        raise ModelUnavailableError(
            f"model {label} is not (wholly) in the Hugging Face cache {constants.HF_HUB_CACHE}"
            f"{offline} and could not be downloaded ({_one_line(exc)}); run fetch-model where "
            "the Hub is reachable, or point HF_HOME at a cache that holds it"
        ) from None
    return Path(path)


def resolve_fetch_source(
    name: str, revision: str | None, variant: str | None
) -> tuple[Path, dict[str, Any]]:
    """The local directory to copy from for a model name, and the manifest's source record."""
    if is_remote_model(name):
        raise ModelUnavailableError(
            f"model {name} is a URL; fetch-model copies a preset, a Hugging Face id or a local "
            "diffusers directory (copy a fetched prefix with your storage's own tools)"
        )
    local = Path(local_model_path(name)).expanduser()
    if name == TINY_MODEL_NAME or local.is_dir():
        if revision:
            raise ModelUnavailableError(
                f"model {name} is not on the Hub, so revision {revision!r} means nothing for it; "
                "drop --revision"
            )
        if name == TINY_MODEL_NAME:
            source = {"name": name, "id": f"tiny-sdxl-v{TINY_MODEL_VERSION}"}
            return ensure_tiny_model(), {**source, "revision": None, "variant": variant}
        directory = local.resolve()
        return directory, {"name": name, "id": str(directory), "revision": None, "variant": variant}
    check_model_name(name, "model")  # a preset's typo: a suggestion, not a Hub error
    repo_id = PRESETS[name].source if name in PRESETS else name
    snapshot = hub_snapshot(name, repo_id, revision, variant)
    # A Hub snapshot's folder is named after the commit it holds: the exact weights.
    return snapshot, {
        "name": name,
        "id": repo_id,
        "revision": revision,
        "commit": snapshot.name,
        "variant": variant,
    }


def fetch_model(
    name: str,
    dest: str,
    revision: str | None = None,
    variant: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> FetchResult:
    """Copy a model's safetensors weights, configs and tokenizers to `dest` (a local folder
    or an fsspec URL) with its manifest, written last.

    Idempotent: files the manifest already at `dest` records with the same size and sha256,
    and that are there with that size, are not copied again. A destination that cannot be
    written (no such bucket, a file in the way) is refused before anything is downloaded.
    """
    storage = Storage(dest, storage_options)
    storage.check_writable(MANIFEST_NAME, FETCH_DESTINATION)
    directory, source = resolve_fetch_source(name, revision, variant)
    files = tuple(
        WeightFile(path, (directory / path).stat().st_size, file_sha256(directory / path))
        for path in select_files(directory, name, variant)
    )
    manifest = WeightsManifest(source=source, files=files)
    recorded = _recorded_files(storage)
    to_copy = [
        entry
        for entry in files
        if recorded.get(entry.path) != entry or storage.file_size(entry.path) != entry.size
    ]
    if to_copy and recorded:
        # The old manifest would vouch for files about to change: the copy is incomplete
        # until the new manifest is written.
        storage.remove(MANIFEST_NAME)
    for entry in to_copy:
        storage.upload_file(str(directory / entry.path), entry.path)
    storage.write_bytes(MANIFEST_NAME, manifest.to_bytes())
    logger.info(
        "fetched %s to %s: %d files, %d copied", name, storage.url(""), len(files), len(to_copy)
    )
    return FetchResult(storage.url(""), len(files), manifest.total_size, len(to_copy))


def _recorded_files(storage: Storage) -> dict[str, WeightFile]:
    """The files the manifest at a destination records; {} without a readable one."""
    if not storage.exists(MANIFEST_NAME):
        return {}
    try:
        manifest = WeightsManifest.from_bytes(storage.read_bytes(MANIFEST_NAME))
    except (ValueError, KeyError, TypeError):
        return {}  # not ours, or damaged: copy everything again
    return {entry.path: entry for entry in manifest.files}


# ---------------------------------------------------------------------------------------
# Loading a fetched copy


def _fetch_hint(url: str, manifest: WeightsManifest | None = None) -> str:
    name = (manifest.source.get("name") if manifest else None) or "NAME"
    return f"copy the model there with `koala-batch fetch-model {name} {url}`"


def open_weights(url: str, storage_options: dict[str, Any] | None) -> Storage:
    """The storage of a fetched copy; ModelUnavailableError where the URL cannot be opened."""
    try:
        return Storage(url, storage_options)
    except Exception as exc:  # noqa: BLE001 - an unknown protocol, a missing backend, bad options
        raise ModelUnavailableError(
            f"model {url} cannot be opened ({_one_line(exc)}); check the URL's protocol and "
            "model.storage_options"
        ) from None


def read_weights_manifest(storage: Storage, url: str) -> tuple[bytes, WeightsManifest]:
    """The manifest of a fetched copy, raw and parsed; ModelUnavailableError naming the fix."""
    try:
        data = storage.read_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        raise ModelUnavailableError(
            f"model {url} holds no fetched model (no {MANIFEST_NAME} there); " + _fetch_hint(url)
        ) from None
    except Exception as exc:  # noqa: BLE001 - denied, unreachable, no credentials: all unreadable
        raise ModelUnavailableError(
            f"model {url} cannot be read ({_one_line(exc)}); check model.storage_options "
            f"(endpoint_url, credentials), or {_fetch_hint(url)}"
        ) from None
    try:
        return data, WeightsManifest.from_bytes(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelUnavailableError(
            f"model {url}: {MANIFEST_NAME} is not a koala-batch weights manifest "
            f"({_one_line(exc)}); {_fetch_hint(url)}"
        ) from None


def check_remote_weights(
    url: str, storage_options: dict[str, Any] | None = None, variant: str | None = None
) -> None:
    """Check a fetched copy from the driver: its manifest reads, every file it lists is
    there with its size, and it holds the weights of `variant` (model.variant).

    Raises ModelUnavailableError naming the URL and the fix.
    """
    storage = open_weights(url, storage_options)
    _, manifest = read_weights_manifest(storage, url)
    fetched_variant = manifest.source.get("variant")
    if fetched_variant != variant:
        raise ModelUnavailableError(
            f"model {url} holds the {fetched_variant or 'plain'} weights, not the "
            f"{variant or 'plain'} ones: set model.variant to {fetched_variant}, or "
            f"{_fetch_hint(url, manifest)}" + (f" --variant {variant}" if variant else "")
        )
    check_copy_sizes(storage, url, manifest)


def check_copy_sizes(storage: Storage, url: str, manifest: WeightsManifest) -> None:
    """Every file the manifest of a fetched copy lists is there with its size (a listing,
    no hashing); ModelUnavailableError naming the first few that are not."""
    try:
        wrong = [e.path for e in manifest.files if storage.file_size(e.path) != e.size]
    except Exception as exc:  # noqa: BLE001 - as for the manifest
        raise ModelUnavailableError(
            f"model {url} cannot be read ({_one_line(exc)}); check model.storage_options"
        ) from None
    if wrong:
        raise ModelUnavailableError(
            f"model {url} is damaged: {len(wrong)} of its {len(manifest.files)} files are "
            f"missing or of another size ({', '.join(wrong[:3])}); {_fetch_hint(url, manifest)}"
        )


@contextmanager
def node_lock(path: Path) -> Iterator[None]:
    """An exclusive lock among the processes of one node, released when they die too."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def local_copy(
    url: str, storage_options: dict[str, Any] | None = None, cache_dir: Path | None = None
) -> Path:
    """A local directory holding the fetched copy at `url`, downloaded at most once per node.

    Cached under `CACHE/models/<hash of the URL and the manifest>`: a copy fetched again
    with other files gets a new directory. The first actor of a node downloads it while
    the others wait on a file lock; every file's sha256 is checked before one rename
    makes the directory appear whole.
    """
    storage = open_weights(url, storage_options)
    data, manifest = read_weights_manifest(storage, url)
    key = hashlib.sha256(
        f"{storage.url('')}\n{hashlib.sha256(data).hexdigest()}".encode()
    ).hexdigest()[:32]
    root = (Path(cache_dir) if cache_dir else default_cache_dir()) / CACHE_FOLDER
    target = root / key
    if (target / MANIFEST_NAME).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with node_lock(root / f"{key}.lock"):
        if (target / MANIFEST_NAME).is_file():
            return target  # another actor of this node downloaded it meanwhile
        for leftover in root.glob(f".{key}-download-*"):  # from a process killed mid-download
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-download-", dir=root))
        try:
            _download(storage, url, manifest, staging)
            (staging / MANIFEST_NAME).write_bytes(data)  # last: the copy is complete
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "downloaded %s (%d files, %d bytes) into %s",
        url,
        len(manifest.files),
        manifest.total_size,
        target,
    )
    return target


def _download(storage: Storage, url: str, manifest: WeightsManifest, staging: Path) -> None:
    for entry in manifest.files:
        local = staging / entry.path
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            storage.download_file(entry.path, str(local))
        except FileNotFoundError:
            raise ModelUnavailableError(
                f"model {url} is damaged: {entry.path}, listed in its {MANIFEST_NAME}, is "
                f"missing; {_fetch_hint(url, manifest)}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - as for the manifest
            raise ModelUnavailableError(
                f"model {url}: {entry.path} cannot be read ({_one_line(exc)}); check "
                "model.storage_options"
            ) from None
        size, digest = local.stat().st_size, file_sha256(local)
        if (size, digest) != (entry.size, entry.sha256):
            raise ModelUnavailableError(
                f"model {url} is damaged: {entry.path} has sha256 {digest[:16]}... and "
                f"{size} bytes where its {MANIFEST_NAME} records {entry.sha256[:16]}... and "
                f"{entry.size}; {_fetch_hint(url, manifest)}"
            )
