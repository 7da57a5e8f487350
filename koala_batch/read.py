"""Reading the prompt table: list the Parquet inputs, check their schemas, plan read units.

Planning reads only Parquet footers, on the driver, so schema problems (a missing or
mistyped column, a corrupt file) fail before any actor or model starts, naming the file
and column. Each read unit is one row group; the read stage turns it into rows with
their source file, row index and global ordinal.
"""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.utils import get_protocol

from koala_batch.config import InputSpec, reveal_storage_options
from koala_batch.errors import InputError
from koala_batch.schemas import Col, require_columns
from koala_batch.storage import filesystem_for, with_retries

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
_GLOB_CHARS = "*?["

# What one read unit (a row group) carries to the read stage.
READ_UNIT_FIELDS = (
    "url",
    "source",
    "file_index",
    "row_group",
    "row_offset",
    "ordinal_offset",
    "num_rows",
)


@dataclass(frozen=True)
class InputFile:
    """One Parquet file of the input, with what its footer says."""

    url: str  # full URL, with protocol
    source: str  # path relative to the input root: the stable part of derived ids
    schema: pa.Schema
    row_group_rows: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return sum(self.row_group_rows)


@dataclass(frozen=True)
class InputPlan:
    """Every input file, in a fixed order, with global row offsets."""

    files: tuple[InputFile, ...]

    @property
    def num_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    def read_units(self) -> list[dict[str, Any]]:
        """One unit per row group: what a read task needs to produce its rows."""
        units = []
        ordinal = 0
        for file_index, input_file in enumerate(self.files):
            row_offset = 0
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
    return filesystem, filesystem._strip_protocol(uri)


def list_input_files(
    spec: InputSpec, filesystem: Any | None = None
) -> list[tuple[Any, str, str, str]]:
    """(filesystem, path, url, source) of every Parquet file the input names, sorted."""
    options = reveal_storage_options(spec.storage_options)
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
            source = posixpath.relpath(file_path, root) if root else file_path
            found.append((fs, file_path, url, source))
    seen: set[str] = set()
    unique = []
    for entry in found:
        if entry[2] not in seen:
            seen.add(entry[2])
            unique.append(entry)
    return unique


def _read_footer(fs: Any, path: str, url: str, source: str) -> InputFile:
    def read() -> pq.FileMetaData:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata

    try:
        metadata = with_retries(read, f"read footer of {url}")
        schema = metadata.schema.to_arrow_schema()
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise InputError(f"input file {url} is not a readable Parquet file: {exc}") from None
    groups = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
    return InputFile(url=url, source=source, schema=schema, row_group_rows=groups)


def _value_type(dtype: pa.DataType) -> pa.DataType:
    """The logical type: pandas categoricals arrive as dictionary-encoded columns."""
    return dtype.value_type if pa.types.is_dictionary(dtype) else dtype


def _is_text(dtype: pa.DataType) -> bool:
    dtype = _value_type(dtype)
    return (
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_string_view(dtype)
        or pa.types.is_null(dtype)
    )


def _describe_columns(schema: pa.Schema) -> str:
    return ", ".join(f"{field.name} ({field.type})" for field in schema)


def check_schema(schema: pa.Schema, spec: InputSpec, file_url: str) -> None:
    """Raise InputError naming the file and column if this schema cannot serve the spec."""
    names = set(schema.names)

    def require(column: str, role: str) -> pa.DataType:
        if column not in names:
            raise InputError(
                f"input file {file_url}: {role} column {column!r} is missing; "
                f"columns present: {_describe_columns(schema)}"
            )
        return schema.field(column).type

    prompt_type = require(spec.prompt_column, "prompt")
    if not _is_text(prompt_type):
        raise InputError(
            f"input file {file_url}: prompt column {spec.prompt_column!r} has type "
            f"{prompt_type}, expected string"
        )
    if spec.negative_prompt_column:
        negative_type = require(spec.negative_prompt_column, "negative prompt")
        if not _is_text(negative_type):
            raise InputError(
                f"input file {file_url}: negative prompt column {spec.negative_prompt_column!r} "
                f"has type {negative_type}, expected string"
            )
    if spec.id_column:
        id_type = require(spec.id_column, "id")
        if not (_is_text(id_type) or pa.types.is_integer(_value_type(id_type))):
            raise InputError(
                f"input file {file_url}: id column {spec.id_column!r} has type {id_type}, "
                "expected string or integer"
            )
    if spec.seed_column:
        seed_type = _value_type(require(spec.seed_column, "seed"))
        if not (
            pa.types.is_integer(seed_type)
            or pa.types.is_floating(seed_type)
            or pa.types.is_null(seed_type)
            or pa.types.is_decimal(seed_type)
        ):
            raise InputError(
                f"input file {file_url}: seed column {spec.seed_column!r} has type {seed_type}, "
                "expected integer"
            )
    for column in spec.passthrough_columns:
        require(column, "passthrough")


def plan_input(spec: InputSpec, filesystem: Any | None = None) -> InputPlan:
    """List the input files and read their footers (in parallel); check every schema.

    With an id column, also reads that column everywhere to refuse duplicate ids: two
    rows with one id would get one key, and one would silently replace the other.
    """
    listed = list_input_files(spec, filesystem)
    with ThreadPoolExecutor(max_workers=min(16, len(listed))) as pool:
        files = list(pool.map(lambda entry: _read_footer(*entry), listed))
        for input_file in files:
            check_schema(input_file.schema, spec, input_file.url)
        plan = InputPlan(files=tuple(files))
        if plan.num_rows == 0:
            raise InputError(
                f"input {', '.join(spec.uris)} holds no rows ({len(files)} file(s), all empty)"
            )
        id_column = spec.id_column
        if id_column:
            id_columns = list(
                pool.map(
                    lambda entry: _read_column(entry[0], entry[1], entry[2], id_column), listed
                )
            )
            check_unique_ids(plan, id_columns, id_column)
    return plan


def _read_column(fs: Any, path: str, url: str, column: str) -> list[Any]:
    def read() -> list[Any]:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).read(columns=[column]).column(column).to_pylist()

    try:
        return with_retries(read, f"read column {column} of {url}")
    except (pa.ArrowInvalid, pa.ArrowException) as exc:
        raise InputError(f"input file {url}: column {column!r} is unreadable: {exc}") from None


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
        *spec.passthrough_columns,
    ]
    return list(dict.fromkeys(column for column in wanted if column))


class ReadRowGroups:
    """Read stage: a batch of read units in, the rows of their row groups out."""

    def __init__(self, spec: InputSpec, filesystem: Any | None = None):
        self.columns = input_columns(spec)
        self.options = reveal_storage_options(spec.storage_options)
        self.filesystem = filesystem

    def read_unit(self, unit: dict[str, Any]) -> pa.Table:
        fs, path = _input_filesystem(unit["url"], self.options, self.filesystem)

        def read() -> pa.Table:
            with fs.open(path, "rb") as handle:
                return pq.ParquetFile(handle).read_row_group(
                    unit["row_group"], columns=self.columns
                )

        try:
            table = with_retries(read, f"read {unit['url']} row group {unit['row_group']}")
        except (pa.ArrowInvalid, pa.ArrowException) as exc:
            raise InputError(
                f"input file {unit['url']}: row group {unit['row_group']} is unreadable: {exc}"
            ) from None
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
        return pa.table({**provenance, **{c: table.column(c) for c in self.columns}})

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(batch, READ_UNIT_FIELDS, "read")
        return pa.concat_tables([self.read_unit(unit) for unit in batch.to_pylist()])
