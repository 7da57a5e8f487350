"""The input's files: list the Parquet inputs, check their schemas, plan read units, and
read a unit's rows.

Planning reads only Parquet footers, on the driver, so schema problems (a missing or
mistyped column, a corrupt file) fail before any actor or model starts, naming the file
and column; so does an input that can reach the job's own output. Each read unit is one
row group; reading turns it into rows with their source file, row index and global
ordinal. A file that turns out damaged while it is read fails for good, naming the file
and row group; only faults of the storage beneath it are retried.

Hive partitions: the `key=value` directories of a file's path below its input root are
columns of its rows, typed and decoded by pyarrow's own hive partitioning (as
`pyarrow.dataset` and `pandas.read_parquet` read them).
"""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Any, TypeVar
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.registry import get_filesystem_class
from fsspec.utils import get_protocol

from koala_batch.compat import strip_protocol
from koala_batch.errors import InputError, SpecError
from koala_batch.schemas import Col
from koala_batch.spec import IMAGES_PER_PROMPT_RULE, InputSpec, reveal_storage_options
from koala_batch.storage import filesystem_for, with_retries

T = TypeVar("T")

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
_GLOB_CHARS = "*?["
# Names one store goes by, so that an input and an output on it are compared as such.
_PROTOCOL_ALIASES = {"s3a": "s3", "gcs": "gs", "local": "file", "abfss": "abfs"}

# What one read unit (a row group) carries to the read stage.
READ_UNIT_FIELDS = (
    "url",
    "source",
    "file_index",
    "row_group",
    "row_offset",
    "ordinal_offset",
    "num_rows",
    "partitions",
)

# What names the rows of a ray.data.Dataset in messages, where a file's URL would be.
DATASET_INPUT = "(ray.data.Dataset)"


@dataclass(frozen=True)
class InputFile:
    """One Parquet file of the input, with what its footer says."""

    url: str  # full URL, with protocol
    source: str  # path relative to the input root: the stable part of derived ids
    schema: pa.Schema  # the columns of its rows: the file's own, then its partition keys
    row_group_rows: tuple[int, ...]
    partitions: tuple[tuple[str, Any], ...] = ()  # (key, value) of its path, in path order

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)

    def partition_row(self) -> bytes | None:
        """Its partition values as a one-row Arrow IPC stream (what a read unit carries:
        typed, and plain bytes to Ray Data); None without partitions."""
        if not self.partitions:
            return None
        row = pa.table(
            {key: pa.array([value], self.schema.field(key).type) for key, value in self.partitions}
        )
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, row.schema) as writer:
            writer.write_table(row)
        return sink.getvalue().to_pybytes()


@dataclass(frozen=True)
class InputPlan:
    """Every input file, in a fixed order, with global row offsets, and how many images
    its rows ask for (`count_images`)."""

    files: tuple[InputFile, ...]
    planned_images: int

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def read_units(self) -> list[dict[str, Any]]:
        """One unit per row group: what a read task needs to produce its rows."""
        units = []
        ordinal = 0
        for file_index, input_file in enumerate(self.files):
            row_offset = 0
            partitions = input_file.partition_row()
            for group, rows in enumerate(input_file.row_group_rows):
                if rows:
                    values = (
                        input_file.url,
                        input_file.source,
                        file_index,
                        group,
                        row_offset,
                        ordinal,
                        rows,
                        partitions,
                    )
                    units.append(dict(zip(READ_UNIT_FIELDS, values, strict=True)))
                row_offset += rows
                ordinal += rows
        return units


def _has_glob(path: str) -> bool:
    return any(char in path for char in _GLOB_CHARS)


def _glob_root(path: str) -> str:
    """The directory part of a glob before its first wildcard."""
    first = min(path.index(char) for char in _GLOB_CHARS if char in path)
    return posixpath.dirname(path[:first])


def _input_filesystem(uri: str, options: dict[str, Any], filesystem: Any | None):
    if filesystem is None:
        return filesystem_for(uri, options)
    return filesystem, strip_protocol(filesystem, uri)


def _location(uri: str) -> tuple[str, str]:
    """(protocol, absolute path without it) of a URI or glob, resolved as far as it can be
    without listing anything: a local path is made absolute and its symlinks followed."""
    protocol = get_protocol(uri)
    protocol = _PROTOCOL_ALIASES.get(protocol, protocol)
    try:
        path = strip_protocol(get_filesystem_class(protocol), uri)
    except (ImportError, ValueError):  # a filesystem not installed: compare the URL as given
        path = uri.split("://", 1)[-1]
    path = path.rstrip("/") or "/"
    if protocol == "file":
        literal = _glob_root(path) if _has_glob(path) else path
        rest = path[len(literal) :]
        path = os.path.realpath(literal) + rest
    return protocol, path


def _segments(path: str) -> list[str]:
    return [part for part in path.split("/") if part]


def _inside(location: tuple[str, str], prefix: tuple[str, str]) -> bool:
    """Whether a (protocol, path) lies under a prefix given the same way."""
    path, root = _segments(location[1]), _segments(prefix[1])
    return location[0] == prefix[0] and len(path) > len(root) and path[: len(root)] == root


def _can_match_below(pattern: list[str], prefix: list[str]) -> bool:
    """Whether a glob (as path segments, `**` any depth) can match a path inside `prefix`."""
    if not prefix:
        return bool(pattern)
    if not pattern:
        return False
    if "**" in pattern[0]:
        return _can_match_below(pattern[1:], prefix) or _can_match_below(pattern, prefix[1:])
    return fnmatchcase(prefix[0], pattern[0]) and _can_match_below(pattern[1:], prefix[1:])


def check_output_outside_input(spec: InputSpec, output_uri: str) -> None:
    """Raise SpecError naming both when the input can reach the output prefix.

    A job whose input reaches its own output reads its manifests (Parquet files with a
    `prompt` column) as new prompts on every rerun, and grows instead of resuming. A
    directory or prefix input reaches everything below it; a glob only what its pattern
    can match, so `DIR/*.parquet` may sit beside `DIR/out`, and a single file reaches
    nothing else. Decided from the URLs alone, so it holds before the output exists.
    """
    out_protocol, out_path = _location(output_uri)
    output = _segments(out_path)
    for uri in spec.uris:
        protocol, path = _location(uri)
        if protocol != out_protocol:
            continue
        literal = _segments(_glob_root(path) if _has_glob(path) else path)
        pattern = _segments(path) if _has_glob(path) else [*literal, "**"]
        if _can_match_below(pattern, output):
            inside = literal[: len(output)] == output
            raise SpecError(
                f"input.uri {uri} {'lies inside' if inside else 'can reach'} output.uri "
                f"{output_uri}: the job would read its own manifests as prompts on a rerun; "
                "write the output outside the input, or name the input files (a glob or "
                "single files) so that none can be under the output"
            )


def list_input_files(
    spec: InputSpec, filesystem: Any | None = None, output_uri: str | None = None
) -> list[tuple[Any, str, str, str]]:
    """(filesystem, path, url, source) of every Parquet file the input names, sorted.

    With `output_uri`, a file inside that prefix (reached by a path the URLs do not show,
    a symlink, say) is refused rather than listed: it would be the job's own output.
    """
    options = reveal_storage_options(spec.storage_options)
    output = _location(output_uri) if output_uri else None
    found: list[tuple[Any, str, str, str]] = []
    for uri in spec.uris:
        fs, path = _input_filesystem(uri, options, filesystem)

        def listing(fs=fs, path=path, uri=uri) -> tuple[str, list[str]]:
            """(root, sorted Parquet paths); retried whole on a transient fault."""
            if _has_glob(path):
                return _glob_root(path), sorted(p for p in fs.glob(path) if fs.isfile(p))
            if fs.isdir(path):
                return path.rstrip("/"), sorted(
                    p for p in fs.find(path) if p.endswith(PARQUET_SUFFIXES)
                )
            if fs.isfile(path):
                return posixpath.dirname(path), [path]
            raise InputError(f"input {uri}: no such file, directory or prefix")

        try:
            root, paths = with_retries(listing, f"list input {uri}")
        except InputError:
            raise
        except FileNotFoundError:
            raise InputError(f"input {uri}: no such file, directory or prefix") from None
        except PermissionError as exc:
            raise InputError(f"input {uri}: access denied ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - unreachable endpoint, bad config, ...
            raise InputError(f"input {uri}: cannot list it ({type(exc).__name__}: {exc})") from None
        if not paths:
            raise InputError(
                f"input {uri}: matched no Parquet files ({', '.join(PARQUET_SUFFIXES)})"
            )
        protocol = get_protocol(uri)
        for file_path in paths:
            url = file_path if protocol == "file" else fs.unstrip_protocol(file_path)
            if output and _inside(_location(url), output):
                raise SpecError(
                    f"input.uri {uri} lists {url}, which is inside output.uri {output_uri}: "
                    "the job would read its own output as prompts; write the output outside "
                    "the input"
                )
            source = posixpath.relpath(file_path, root) if root else file_path
            found.append((fs, file_path, url, source))
    seen: set[str] = set()
    unique = []
    for entry in found:
        if entry[2] not in seen:
            seen.add(entry[2])
            unique.append(entry)
    return unique


class _WatchedFile:
    """A file object that remembers whether the storage beneath it failed.

    pyarrow reports a damaged file (corrupt compressed data, a truncated page) as a plain
    OSError, the type a dropped connection has too; only the handle knows which it was.
    A storage fault comes out of pyarrow as the handle raised it.
    """

    def __init__(self, handle: Any):
        self._handle = handle
        self.storage_failed = False

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._handle, name)
        if not callable(attribute):
            return attribute

        def watched(*args: Any, **kwargs: Any) -> Any:
            try:
                return attribute(*args, **kwargs)
            except BaseException:
                self.storage_failed = True
                raise

        return watched


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def read_parquet(
    fs: Any, path: str, read: Callable[[pq.ParquetFile], T], describe: str, damaged: str
) -> T:
    """Open a Parquet file and run `read` on it, retrying faults of the storage only.

    `describe` names the operation in a storage error's note. Anything else that fails is
    the file's own content, and rereading gives the same bytes: an InputError that starts
    with `damaged` (which names the file and the part read) and says what to do, raised
    at once.
    """

    def attempt() -> T:
        with fs.open(path, "rb") as handle:
            watched = _WatchedFile(handle)
            try:
                return read(pq.ParquetFile(watched))
            except Exception as exc:
                if watched.storage_failed or isinstance(exc, MemoryError):
                    raise
                raise InputError(
                    f"{damaged}: {_one_line(exc)}; the file is damaged: rewrite it, or take "
                    "it out of the input"
                ) from None

    return with_retries(attempt, describe)


def _read_footer(fs: Any, path: str, url: str, source: str) -> InputFile:
    def schema_of(parquet: pq.ParquetFile) -> tuple[pq.FileMetaData, pa.Schema]:
        return parquet.metadata, parquet.metadata.schema.to_arrow_schema()

    try:
        metadata, schema = read_parquet(
            fs,
            path,
            schema_of,
            f"read footer of {url}",
            f"input file {url} is not a readable Parquet file",
        )
    except InputError:
        raise
    except OSError as exc:
        raise InputError(f"input file {url} cannot be read: {_one_line(exc)}") from None
    groups = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    return InputFile(url=url, source=source, schema=schema, row_group_rows=groups)


# The value pyarrow and Spark read as a null partition value.
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


def hive_partitions(
    listed: list[tuple[Any, str, str, str]],
) -> tuple[pa.Schema, list[tuple[tuple[str, Any], ...]]]:
    """The hive partitions of listed files (`list_input_files`): the partition schema and
    each file's (key, value) pairs, in path order.

    A file's partitions are the `key=value` directories of its path below its input root.
    pyarrow's own discovery types them across all files (int32 where every value is one,
    else string), decodes URL escapes and reads `__HIVE_DEFAULT_PARTITION__` as null, so
    the columns are those `pyarrow.dataset` gives; no file is opened. A key repeated in one
    path, files under different keys, or a key null in every file is an InputError naming
    the file and the key.
    """
    directories = [posixpath.dirname(entry[3]) for entry in listed]
    if not any("=" in directory for directory in directories):
        return pa.schema([]), [()] * len(listed)
    factory = pads.FileSystemDatasetFactory(
        # Only the paths are parsed: with no fragment inspected, nothing is read or listed.
        pafs.LocalFileSystem(),
        [f"/{entry[3]}" for entry in listed],
        pads.ParquetFileFormat(),
        pads.FileSystemFactoryOptions(
            partition_base_dir="/",
            partitioning=pads.HivePartitioning.discover(null_fallback=HIVE_NULL),
        ),
    )
    try:
        schema = factory.inspect(fragments=0)
    except pa.ArrowInvalid as exc:  # a key whose every value is null has no type
        values: dict[str, set[str]] = {}
        first_url: dict[str, str] = {}
        for entry, directory in zip(listed, directories, strict=True):
            for segment in directory.split("/"):
                if "=" in segment:
                    key, value = (unquote(part) for part in segment.split("=", 1))
                    values.setdefault(key, set()).add(value)
                    first_url.setdefault(key, entry[2])
        null = next((key for key, seen in values.items() if seen == {HIVE_NULL}), "?")
        raise InputError(
            f"input file {first_url.get(null, listed[0][2])}: partition key {null!r} is "
            f"{HIVE_NULL} (null) in every file, so it has no type ({_one_line(exc)}); give it "
            "a value in at least one path, or take those files out of the input"
        ) from None
    partitioning = pads.HivePartitioning(schema, null_fallback=HIVE_NULL)
    found: list[tuple[tuple[str, Any], ...]] = []
    for entry, directory in zip(listed, directories, strict=True):
        pairs: list[tuple[str, Any]] = []
        for segment in directory.split("/"):
            if "=" in segment:
                parsed = pads.get_partition_keys(partitioning.parse(f"/{segment}/file"))
                pairs.extend(parsed.items())
        keys = [key for key, _ in pairs]
        repeated = next((key for key in keys if keys.count(key) > 1), None)
        if repeated is not None:
            raise InputError(
                f"input file {entry[2]}: partition key {repeated!r} appears twice in its path; "
                "each key=value directory level must name a different key"
            )
        found.append(tuple(pairs))
    first_keys = [key for key, _ in found[0]]
    for entry, file_pairs in zip(listed, found, strict=True):
        keys = [key for key, _ in file_pairs]
        if keys != first_keys:
            odd = [key for key in keys if key not in first_keys]
            missing = [key for key in first_keys if key not in keys]
            key = (odd or missing or keys)[0]
            raise InputError(
                f"input file {entry[2]}: partition key {key!r} differs from input file "
                f"{listed[0][2]} (partition keys: {'/'.join(keys) or 'none'} here, "
                f"{'/'.join(first_keys) or 'none'} there); every file of a hive-partitioned "
                "input must lie under the same key=value directories, in the same order"
            )
    return schema, found


def with_partitions(
    input_file: InputFile, pairs: tuple[tuple[str, Any], ...], partition_schema: pa.Schema
) -> InputFile:
    """The file with its partition keys as columns after its own; InputError naming the
    file and key when a key is also a column inside the file (which would be ambiguous)."""
    if not pairs:
        return input_file
    for key, _ in pairs:
        if key in input_file.schema.names:
            raise InputError(
                f"input file {input_file.url}: partition key {key!r} of its path is also a "
                "column inside the file, so its rows would have two values for it; drop the "
                f"column from the file, or rename the {key}=... directories"
            )
    fields = [partition_schema.field(key) for key, _ in pairs]
    schema = pa.schema([*input_file.schema, *fields], metadata=input_file.schema.metadata)
    return replace(input_file, schema=schema, partitions=pairs)


def _column_of(
    entry: tuple[Any, str, str, str],
    input_file: InputFile,
    column: str,
    read: Callable[[Any, str, str, str], list[Any]],
) -> list[Any]:
    """A column's values in one file: its partition value on every row, or `read` from it."""
    partitions = dict(input_file.partitions)
    if column in partitions:
        return [partitions[column]] * input_file.num_rows
    return read(entry[0], entry[1], entry[2], column)


def _value_type(dtype: pa.DataType) -> pa.DataType:
    """The logical type: pandas categoricals arrive as dictionary-encoded columns."""
    return dtype.value_type if pa.types.is_dictionary(dtype) else dtype


def is_text(dtype: pa.DataType) -> bool:
    dtype = _value_type(dtype)
    return (
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_string_view(dtype)
        or pa.types.is_null(dtype)
    )


def describe_columns(schema: pa.Schema) -> str:
    return ", ".join(f"{field.name} ({field.type})" for field in schema)


def check_schema(schema: pa.Schema, spec: InputSpec, file_url: str) -> None:
    """Raise InputError naming the file and column if this schema cannot serve the spec."""
    names = set(schema.names)

    def require(column: str, role: str) -> pa.DataType:
        if column not in names:
            raise InputError(
                f"input file {file_url}: {role} column {column!r} is missing; "
                f"columns present: {describe_columns(schema)}"
            )
        return schema.field(column).type

    prompt_type = require(spec.prompt_column, "prompt")
    if not is_text(prompt_type):
        raise InputError(
            f"input file {file_url}: prompt column {spec.prompt_column!r} has type "
            f"{prompt_type}, expected string"
        )
    if spec.negative_prompt_column:
        negative_type = require(spec.negative_prompt_column, "negative prompt")
        if not is_text(negative_type):
            raise InputError(
                f"input file {file_url}: negative prompt column {spec.negative_prompt_column!r} "
                f"has type {negative_type}, expected string"
            )
    if spec.id_column:
        id_type = require(spec.id_column, "id")
        if not (is_text(id_type) or pa.types.is_integer(_value_type(id_type))):
            raise InputError(
                f"input file {file_url}: id column {spec.id_column!r} has type {id_type}, "
                "expected string or integer"
            )
    for role, column in spec.parameter_columns.items():
        if column is None:
            continue
        name = role.removesuffix("_column")
        value_type = _value_type(require(column, name))
        if not _is_number(value_type):
            raise InputError(
                f"input file {file_url}: {name} column {column!r} has type {value_type}, "
                "expected a number"
            )
    if spec.seed_column:
        seed_type = _value_type(require(spec.seed_column, "seed"))
        if not _is_number(seed_type):
            raise InputError(
                f"input file {file_url}: seed column {spec.seed_column!r} has type {seed_type}, "
                "expected integer"
            )
    for column in spec.passthrough_columns:
        require(column, "passthrough")


def _is_number(value_type: pa.DataType) -> bool:
    """Whether a column of this type can hold a number (all null counts: values are checked
    per row)."""
    return (
        pa.types.is_integer(value_type)
        or pa.types.is_floating(value_type)
        or pa.types.is_null(value_type)
        or pa.types.is_decimal(value_type)
    )


def images_of_row(value: Any, images_per_prompt: int) -> int:
    """How many work rows a row with this images_per_prompt column value becomes: its value,
    the spec's for null, one (its error row) for a bad value."""
    count, problem = IMAGES_PER_PROMPT_RULE.parse(value)
    if problem is not None:
        return 1
    return images_per_prompt if count is None else int(count)


def count_images(values: list[Any], images_per_prompt: int) -> int:
    """The images a file's images_per_prompt column values ask for (`images_of_row`)."""
    return sum(
        images_of_row(value, images_per_prompt) * times for value, times in Counter(values).items()
    )


def plan_input(
    spec: InputSpec,
    filesystem: Any | None = None,
    output_uri: str | None = None,
    images_per_prompt: int = 1,
) -> InputPlan:
    """List the input files and read their footers (in parallel); check every schema.

    With `output_uri` (the job's output prefix), an input that can reach it is refused
    first (`check_output_outside_input`).

    With an id column, also reads that column everywhere to refuse duplicate ids: two
    rows with one id would get one key, and one would silently replace the other. With an
    images_per_prompt column, reads that column to count the images planned; otherwise
    they are the rows times `images_per_prompt` (generation.images_per_prompt).
    """
    if output_uri:
        check_output_outside_input(spec, output_uri)
    listed = list_input_files(spec, filesystem, output_uri)
    partition_schema, partitions = hive_partitions(listed)
    with ThreadPoolExecutor(max_workers=min(16, len(listed))) as pool:
        files = list(pool.map(lambda entry: _read_footer(*entry), listed))
        files = [
            with_partitions(input_file, pairs, partition_schema)
            for input_file, pairs in zip(files, partitions, strict=True)
        ]
        for input_file in files:
            check_schema(input_file.schema, spec, input_file.url)
        plan = InputPlan(files=tuple(files), planned_images=0)
        if plan.num_rows == 0:
            raise InputError(
                f"input {', '.join(spec.uris)} holds no rows ({len(files)} file(s), all empty)"
            )
        id_column = spec.id_column
        if id_column:
            id_columns = list(
                pool.map(
                    lambda entry, input_file: _column_of(
                        entry, input_file, id_column, _read_column
                    ),
                    listed,
                    files,
                )
            )
            check_unique_ids(plan, id_columns, id_column)
        images_column = spec.images_per_prompt_column
        if images_column:
            counts = pool.map(
                lambda entry, input_file: count_images(
                    _column_of(entry, input_file, images_column, _read_values), images_per_prompt
                ),
                listed,
                files,
            )
            plan = replace(plan, planned_images=sum(counts))
        else:
            plan = replace(plan, planned_images=plan.num_rows * images_per_prompt)
    return plan


def _read_values(fs: Any, path: str, url: str, column: str) -> list[Any]:
    """A column's values as Python objects."""
    return read_parquet(
        fs,
        path,
        lambda parquet: parquet.read(columns=[column]).column(column).to_pylist(),
        f"read column {column} of {url}",
        f"input file {url}: column {column!r} is unreadable",
    )


def _read_column(fs: Any, path: str, url: str, column: str) -> list[Any]:
    """An id column's values; InputError naming the file and row of one not valid UTF-8."""
    values = read_parquet(
        fs,
        path,
        lambda parquet: parquet.read(columns=[column]).column(column),
        f"read column {column} of {url}",
        f"input file {url}: column {column!r} is unreadable",
    )
    ids, bad = text_values(values)
    if bad:
        row, why = next(iter(bad.items()))
        raise InputError(
            f"input file {url}: id column {column!r} row {row}: {why} ({len(bad)} such row(s) "
            "in this file); ids must be text: rewrite the file with valid UTF-8 ids"
        )
    return ids


_BINARY_OF = {
    pa.string(): pa.binary(),
    pa.large_string(): pa.large_binary(),
    pa.string_view(): pa.binary_view(),
}


def text_values(column: pa.Array | pa.ChunkedArray) -> tuple[list[Any], dict[int, str]]:
    """A column's values as Python objects, and {position: why} for text that is not UTF-8.

    Parquet stores a string column as bytes, and neither writers nor readers check them,
    so bad bytes surface only when a value becomes a Python str. Such a value comes back
    decoded with backslash escapes (b"caf\\xe9" as "caf\\xe9"): readable, and storable
    as a string.
    """
    try:
        return column.to_pylist(), {}
    except UnicodeDecodeError:
        pass  # the slow path below, only for a batch that holds a bad value
    values: list[Any] = []
    bad: dict[int, str] = {}
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for chunk in chunks:
        if isinstance(chunk, pa.DictionaryArray):
            chunk = chunk.dictionary_decode()
        for raw in chunk.view(_BINARY_OF[chunk.type]).to_pylist():
            if raw is None:
                values.append(None)
                continue
            try:
                values.append(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                bad[len(values)] = (
                    f"byte 0x{raw[exc.start]:02x} at offset {exc.start} is not valid UTF-8"
                )
                values.append(raw.decode("utf-8", "backslashreplace"))
    return values, bad


def check_unique_ids(plan: InputPlan, id_columns: list[list[Any]], id_column: str) -> None:
    """Raise InputError naming the first duplicated id and both of its rows."""
    first_seen: dict[str, tuple[str, int]] = {}
    duplicates: list[str] = []
    for input_file, values in zip(plan.files, id_columns, strict=True):
        for row_index, value in enumerate(values):
            if value is None:
                continue  # a null id is a row-level error, reported in the manifest
            row_id = str(value)
            where = (input_file.url, row_index)
            if row_id in first_seen:
                if len(duplicates) < 5:
                    earlier = first_seen[row_id]
                    duplicates.append(
                        f"{row_id[:80]!r} at {earlier[0]} row {earlier[1]} and "
                        f"{where[0]} row {where[1]}"
                    )
                else:
                    duplicates.append("")
            else:
                first_seen[row_id] = where
    if duplicates:
        shown = "; ".join(d for d in duplicates if d)
        raise InputError(
            f"id column {id_column!r} has {len(duplicates)} duplicate id(s), e.g. {shown}; ids "
            "must be unique (each id names its images), so the job was refused before "
            "generating anything"
        )


def input_columns(spec: InputSpec) -> list[str]:
    """The input columns a job reads, each once, in a fixed order."""
    wanted = [
        spec.prompt_column,
        spec.id_column,
        spec.negative_prompt_column,
        spec.seed_column,
        *spec.parameter_columns.values(),
        *spec.passthrough_columns,
    ]
    return list(dict.fromkeys(column for column in wanted if column))


class RowGroupReader:
    """Reads one read unit (a row group) into its rows, with their provenance."""

    def __init__(self, spec: InputSpec, filesystem: Any | None = None):
        self.columns = input_columns(spec)
        self.options = reveal_storage_options(spec.storage_options)
        self.filesystem = filesystem

    def read_unit(self, unit: dict[str, Any]) -> pa.Table:
        fs, path = _input_filesystem(unit["url"], self.options, self.filesystem)
        first = unit["row_offset"]
        partitions = _partition_values(unit["partitions"])
        in_file = [column for column in self.columns if column not in partitions]
        table = read_parquet(
            fs,
            path,
            lambda parquet: parquet.read_row_group(unit["row_group"], columns=in_file),
            f"read {unit['url']} row group {unit['row_group']}",
            f"input file {unit['url']}: row group {unit['row_group']} (rows {first} to "
            f"{first + unit['num_rows'] - 1}) is unreadable",
        )
        count = table.num_rows
        row_index = pa.array(range(unit["row_offset"], unit["row_offset"] + count), pa.int64())
        ordinal = pa.array(
            range(unit["ordinal_offset"], unit["ordinal_offset"] + count), pa.int64()
        )
        provenance = {
            Col.SOURCE: pa.array([unit["source"]] * count, pa.string()),
            Col.ROW_INDEX: row_index,
            Col.ROW_ORDINAL: ordinal,
        }
        columns = {
            column: pa.repeat(partitions[column], count)
            if column in partitions
            else table.column(column)
            for column in self.columns
        }
        return pa.table({**provenance, **columns})


def _partition_values(row: bytes | None) -> dict[str, pa.Scalar]:
    """A read unit's partition values (`InputFile.partition_row`), by key."""
    if not row:
        return {}
    table = pa.ipc.open_stream(row).read_all()
    return {name: table.column(name)[0] for name in table.column_names}
