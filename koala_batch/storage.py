"""The one storage layer: every read and write of a job goes through fsspec here.

A `Storage` is a filesystem plus a root prefix. Writes are atomic (an object store's
PUT is; local files are written aside and renamed), transient errors are retried, and
every path is checked to stay under the root.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from koala_batch.compat import strip_protocol
from koala_batch.errors import KoalaBatchError, OutputUnwritableError, StorageError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Suffix of a local file being written aside before its rename into place.
PARTIAL_SUFFIX = ".partial"

# Errors that mean "the request did not go through, try again"; a missing file or a
# refused permission is an answer, not a fault, and is never retried.
_PERMANENT_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    StorageError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether a storage exception is worth retrying."""
    if isinstance(exc, _PERMANENT_ERRORS):
        return False
    return isinstance(exc, (OSError, ConnectionError, TimeoutError))


def with_retries(
    operation: Callable[[], T],
    describe: str,
    attempts: int = 5,
    first_delay_s: float = 0.2,
) -> T:
    """Run a storage operation, retrying transient failures with exponential back-off."""
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except Exception as exc:
            if not is_transient(exc) or attempt == attempts:
                if isinstance(exc, OSError):
                    # Name what failed: the error often does not (an object store's
                    # "Access Denied" names no key). A note keeps the exception's type.
                    tries = f"after {attempt} attempts" if attempt > 1 else "not retried"
                    exc.add_note(f"koala-batch storage: {describe} failed ({tries})")
                raise
            logger.warning(
                "%s failed (%s: %s); retry %d of %d in %.1fs",
                describe,
                type(exc).__name__,
                exc,
                attempt,
                attempts - 1,
                delay,
            )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


def filesystem_for(uri: str, storage_options: dict[str, Any] | None = None):
    """(filesystem, path-without-protocol) for a URL or local path."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path


def is_local(fs: Any) -> bool:
    """Whether the filesystem is the local disk (needs write-aside-and-rename for atomicity)."""
    return isinstance(fs, LocalFileSystem)


@dataclass(frozen=True)
class WriteTarget:
    """How a message names a prefix koala-batch writes, and the settings that fix it."""

    noun: str = "output"
    uri_setting: str = "output.uri"
    options_setting: str = "output.storage_options"
    endpoint_setting: str = "output.storage_options endpoint_url"


# A job's output prefix (what `run` and `validate` check).
OUTPUT_TARGET = WriteTarget()


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = getattr(fs, "protocol", ())
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


class Storage:
    """A filesystem and a root prefix; all paths given to it are relative to the root."""

    def __init__(
        self, uri: str, storage_options: dict[str, Any] | None = None, filesystem: Any | None = None
    ):
        if filesystem is not None:
            self.fs = filesystem
            self.root = strip_protocol(filesystem, uri).rstrip("/")
        else:
            self.fs, root = filesystem_for(uri, storage_options)
            self.root = root.rstrip("/")
        self.uri = uri

    def __repr__(self) -> str:
        return f"Storage({self.url('')!r})"

    # paths ---------------------------------------------------------------------------

    def path(self, relative: str) -> str:
        """Absolute filesystem path of a relative one; refuses anything leaving the root."""
        normalized = (
            posixpath.normpath(posixpath.join(self.root, relative)) if relative else self.root
        )
        if not self.root:
            return normalized
        if normalized != self.root and not normalized.startswith(self.root + "/"):
            raise StorageError(f"path {relative!r} escapes the output prefix {self.root!r}")
        return normalized

    def url(self, relative: str) -> str:
        """Full URL (with protocol) of a relative path, for records and messages."""
        return self.fs.unstrip_protocol(self.path(relative))

    def forget_listings(self) -> None:
        """Drop what the filesystem cached of listings.

        fsspec shares one filesystem instance per set of options in a process, and s3fs
        answers `info` (so `cat_file`, `exists`) from a directory listing it cached
        earlier. Other processes (the writers) add files meanwhile: a listing cached by an
        earlier run in this process would hide them.
        """
        # All of them: `invalidate_cache(path)` drops a path and its parents, not what
        # lies below it, and a listing cached again costs one request.
        self.fs.invalidate_cache()

    # reads ---------------------------------------------------------------------------

    def exists(self, relative: str) -> bool:
        return with_retries(
            lambda: self.fs.exists(self.path(relative)), f"exists {self.url(relative)}"
        )

    def is_file(self, relative: str) -> bool:
        """Whether a relative path ("" for the root itself) is a file."""
        return with_retries(
            lambda: self.fs.isfile(self.path(relative)), f"stat {self.url(relative)}"
        )

    def read_bytes(self, relative: str) -> bytes:
        return with_retries(
            lambda: self.fs.cat_file(self.path(relative)), f"read {self.url(relative)}"
        )

    def list_files(self, relative_dir: str, suffix: str = "") -> list[str]:
        """Names (not paths) of the files directly under a directory, sorted; [] if absent."""
        directory = self.path(relative_dir)

        def listing() -> list[str]:
            try:
                entries = self.fs.ls(directory, detail=True, refresh=True)
            except FileNotFoundError:
                return []
            return sorted(
                posixpath.basename(entry["name"].rstrip("/"))
                for entry in entries
                if entry.get("type") == "file" and entry["name"].endswith(suffix)
            )

        return with_retries(listing, f"list {self.url(relative_dir)}")

    def file_size(self, relative: str) -> int | None:
        """Size in bytes of a file, or None where there is none."""

        def size() -> int | None:
            try:
                return int(self.fs.size(self.path(relative)))
            except FileNotFoundError:
                return None

        return with_retries(size, f"stat {self.url(relative)}")

    def download_file(self, relative: str, local_path: str) -> None:
        """Copy a file to a local path (replacing what is there), streamed."""
        with_retries(
            lambda: self.fs.get_file(self.path(relative), local_path),
            f"download {self.url(relative)}",
        )

    @contextmanager
    def open_read(self, relative: str) -> Iterator[Any]:
        with self.fs.open(self.path(relative), "rb") as handle:
            yield handle

    # writes --------------------------------------------------------------------------

    def _put_atomically(self, relative: str, put: Callable[[str], None], verb: str) -> None:
        """Run `put(path)` so that readers see the old object or the new one, never part.

        An object store's PUT (multipart included) is already atomic; a local file is
        written aside and renamed into place.
        """
        target = self.path(relative)
        if not is_local(self.fs):
            with_retries(lambda: put(target), f"{verb} {self.url(relative)}")
            return
        directory = posixpath.dirname(target)
        with_retries(lambda: self.fs.makedirs(directory, exist_ok=True), f"mkdir {directory}")
        aside = f"{target}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"

        def write_aside_and_rename() -> None:
            try:
                put(aside)
                self.fs.mv(aside, target)
            finally:
                if self.fs.exists(aside):
                    self.fs.rm(aside)

        with_retries(write_aside_and_rename, f"{verb} {self.url(relative)}")

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write a whole object atomically."""
        self._put_atomically(relative, lambda path: self.fs.pipe_file(path, data), "write")

    def create_exclusive(self, relative: str, data: bytes) -> bool:
        """Write a whole object only where none exists: False if one does.

        Atomic where the storage allows it: a hard link of a file written aside locally,
        a conditional PUT (If-None-Match) on S3. Elsewhere the check and the write are two
        steps. A retried attempt that finds its own earlier write counts as created.
        """
        target = self.path(relative)

        def create() -> None:
            if is_local(self.fs):
                directory = posixpath.dirname(target)
                self.fs.makedirs(directory, exist_ok=True)
                aside = f"{target}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"
                try:
                    self.fs.pipe_file(aside, data)
                    os.link(aside, target)
                finally:
                    with suppress(FileNotFoundError):
                        self.fs.rm_file(aside)
            elif "s3" in _protocols(self.fs):
                self.fs.pipe_file(target, data, mode="create")
            else:
                if self.fs.exists(target):
                    raise FileExistsError(target)
                self.fs.pipe_file(target, data)

        try:
            with_retries(create, f"create {self.url(relative)}")
        except FileExistsError:
            try:
                return self.read_bytes(relative) == data
            except FileNotFoundError:
                # Removed since: another run's, released (this run's own stays put).
                return False
        return True

    def upload_file(self, local_path: str, relative: str) -> None:
        """Copy a local file to a relative path atomically."""
        self._put_atomically(relative, lambda path: self.fs.put_file(local_path, path), "upload")

    def remove_empty_folder(self, relative: str) -> None:
        """Remove a folder that its files' removal left empty, where folders exist (the
        local disk): readers that walk folders would take an empty one for a shard.
        Object stores have no folders; a folder that is not empty stays."""
        if is_local(self.fs):
            with suppress(OSError):
                os.rmdir(self.path(relative))

    def remove(self, relative: str) -> None:
        target = self.path(relative)

        def remove_if_present() -> None:
            with suppress(FileNotFoundError):
                self.fs.rm_file(target)

        with_retries(remove_if_present, f"remove {self.url(relative)}")

    def check_writable(self, relative: str, names: WriteTarget = OUTPUT_TARGET) -> None:
        """Prove the prefix can be written: write and remove an empty probe beside `relative`.

        The probe is named as a write-aside partial of `relative`
        (`{relative}.{hex}.partial`), so one left by a crash is a leftover that a resumed
        run removes, never a foreign file. A local prefix that does not exist yet is not
        made: its nearest existing parent must be a directory this process may write.
        Raises OutputUnwritableError (StorageError where the storage stayed unreachable)
        naming the prefix's URL, and the settings that fix it as `names` calls them.
        """
        probe = f"{relative}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"
        target = self.path(probe)
        written = False

        def write_probe() -> None:
            nonlocal written
            directory = posixpath.dirname(target)
            if is_local(self.fs) and not os.path.isdir(directory):
                # Made and removed here, a directory could vanish under a run making it.
                existing = directory
                while not os.path.exists(existing):
                    existing = posixpath.dirname(existing)
                if not os.path.isdir(existing):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), existing)
                if not os.access(existing, os.W_OK | os.X_OK):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), existing)
                return
            self.fs.pipe_file(target, b"")
            written = True

        try:
            with_retries(write_probe, f"write {self.url(probe)}")
        except Exception as exc:  # noqa: BLE001 - whatever refused the write, name the URL
            raise unwritable_output(self.url(""), exc, names) from None
        finally:
            try:
                if written:
                    self.remove(probe)
            except OSError as exc:
                # Harmless: a partial write is a leftover that a resumed run removes.
                logger.warning("could not remove the probe %s: %s", self.url(probe), exc)


def unwritable_output(
    url: str, exc: BaseException, names: WriteTarget = OUTPUT_TARGET
) -> KoalaBatchError:
    """The one-line error for a prefix that refused a write, naming its URL."""
    if isinstance(exc, KoalaBatchError):
        return exc
    detail = " ".join(str(exc).split()) or "no detail"
    cause = f"{type(exc).__name__}: {detail}"
    where, options = f"{names.noun} {url}", names.options_setting
    if is_transient(exc):
        return StorageError(
            f"{where} cannot be written ({cause}, after retries); check that the storage "
            f"is reachable ({names.endpoint_setting}), then rerun"
        )
    if isinstance(exc, FileNotFoundError):
        hint = f"does the bucket exist? Create it, or fix {names.uri_setting}"
    elif isinstance(exc, PermissionError):
        hint = f"the credentials may not write there: fix {options} or the bucket's permissions"
    elif isinstance(exc, (FileExistsError, NotADirectoryError)):
        hint = f"a file stands where a directory is needed: choose another {names.uri_setting}"
    else:
        hint = f"fix {names.uri_setting} or {options}"
    return OutputUnwritableError(f"{where} cannot be written ({cause}); {hint}")


R = TypeVar("R")


def bounded_map(
    pool: ThreadPoolExecutor, function: Callable[[T], R], items: list[T], in_flight: int
) -> Iterator[R]:
    """`pool.map` in order, with at most `in_flight` items started and not yet consumed,
    so memory stays a few shards (or row groups) however large the output."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
