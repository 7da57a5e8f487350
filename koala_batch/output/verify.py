"""Verify a finished (or partial) output: every committed shard is whole and consistent.

`verify_output` reads what readers trust, the committed shards (`manifests/{shard}.parquet`
and the shard's data in its format: `shards/{shard}.tar`, `shards/{shard}.parquet` or
`shards/{shard}/`), and checks each against the other:

- the manifest is readable and has the manifest columns, its `shard` column names its
  file, and the shard name derives from its rows (as the writer names shards; for a
  manifest that a retry of failed images rewrote, from its rows and the error rows it
  retired, each of which must have its one row in another manifest);
- every ok row's member `{key}.{ext}` is in the shard's data exactly once (a tar member, a
  Parquet row whose `image.path` it is, or a file in the shard's folder), with the
  manifest's sha256 and byte count, and decodes with Pillow at the row's width x height;
  in a tar it has its `{key}.json` sidecar (valid JSON with the row's key and id), in a
  Parquet file its row has the manifest row's key, id and image index and the file the
  Hugging Face Image feature in its metadata, and a folder's metadata.parquet lists
  exactly its images (`file_name`) with their keys;
- error rows carry an error message and have no data; the data hold nothing else;
- keys, and (id, image_index) pairs, are unique across all manifests (a key with an
  error row in one shard and a newer row in another is a retry cut short, which a resume
  resolves), and every key is the one `keys.sample_key` gives its id and image index;
- `_SUCCESS`, when present, lists exactly the committed shards and counts their rows;
- with a spec: the output is that spec's job (fingerprint), and every image the input
  plans (computed by the read and validate stages themselves) is committed, and no
  other.

Uncommitted files (data without a manifest, half-written `*.partial` files) are listed as
leftovers: readers ignore them and a resumed run deletes them, so they fail nothing. A
file koala-batch did not write (`layout.classify`: foreign) is a problem: `run` refuses
an output holding one.

Shards are checked in a thread pool, each streamed through its own worker, so memory is
a few shards' manifests and one image per worker, plus the set of keys.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from koala_batch.inputs.files import plan_input
from koala_batch.inputs.rows import planned_images
from koala_batch.keys import sample_key, shard_name
from koala_batch.output.commit import JOB_FILE_FORMAT, retired_rows
from koala_batch.output.formats import FORMATS
from koala_batch.output.formats.base import Problems, ShardToScan, short
from koala_batch.output.layout import (
    EXTENSIONS,
    JOB_FILE,
    MANIFESTS_DIR,
    SUCCESS_FILE,
    ShardRecord,
    image_member,
    list_output,
    manifest_path,
    recorded_data_bytes,
    recorded_format,
    sidecar_member,
)
from koala_batch.output.stats import describe_cost
from koala_batch.schemas import (
    MANIFEST_COLUMNS,
    MANIFEST_FIELDS,
    SPEC_CONSTANT_COLUMNS,
    STATUS_ERROR,
    STATUS_OK,
    Col,
)
from koala_batch.spec import JobSpec, reveal_storage_options
from koala_batch.storage import Storage, bounded_map, with_retries

# Manifest columns each row check reads.
_ROW_COLUMNS = [
    Col.KEY,
    Col.ID,
    Col.IMAGE_INDEX,
    Col.SHARD,
    Col.MEMBER,
    Col.SHA256,
    Col.BYTES,
    Col.STATUS,
    Col.ERROR,
    Col.ORDINAL,
    Col.MADE_FROM,
    Col.WIDTH,
    Col.HEIGHT,
    *SPEC_CONSTANT_COLUMNS,
]


@dataclass
class VerifyReport:
    """What `verify_output` found. `problems` holds at most `max_problems_listed` messages;
    `problems_total` counts them all."""

    output: str
    shards_checked: int = 0
    rows_checked: int = 0  # manifest rows
    images_checked: int = 0  # ok rows whose image was decoded
    problems: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    missing_inputs: int = 0
    # with a spec: ok images whose input row changed since (prompt, seed, parameters)
    changed_inputs: int = 0
    problems_total: int = 0
    rows_ok: int = 0
    rows_failed: int = 0  # error rows (status != ok): recorded failures, not problems
    expected_images: int | None = None  # with a spec: images the input plans
    # With an accumulating spec (output.accumulate): committed images of rows no longer in
    # the input, kept from earlier runs (without it they are problems: unexpected keys).
    kept_images: int | None = None
    success_present: bool = False
    notes: list[str] = field(default_factory=list)
    cost: dict[str, Any] | None = None  # `_SUCCESS`'s cost section (the last run's)

    @property
    def ok(self) -> bool:
        return self.problems_total == 0 and not self.problems

    def format(self) -> str:
        lines = [f"verify {self.output}"]
        lines.append(
            f"  shards: {self.shards_checked}, manifest rows: {self.rows_checked} "
            f"({self.rows_ok} ok, {self.rows_failed} error rows), images decoded: "
            f"{self.images_checked}"
        )
        if self.expected_images is not None:
            lines.append(
                f"  input: {self.expected_images} image(s) planned, {self.missing_inputs} missing, "
                f"{self.changed_inputs} of changed rows"
                + (
                    f"; {self.kept_images} image(s) of earlier inputs kept (output.accumulate)"
                    if self.kept_images is not None
                    else ""
                )
            )
        lines.append(f"  {SUCCESS_FILE}: {'present' if self.success_present else 'absent'}")
        compute = describe_cost(self.cost)
        if compute:
            lines.append(f"  compute: {compute}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.leftovers:
            lines.append(
                f"  leftovers ({len(self.leftovers)}; not committed, ignored by readers, "
                "removed by a resumed run):"
            )
            lines.extend(f"    {leftover}" for leftover in self.leftovers)
        total = max(self.problems_total, len(self.problems))
        if total:
            lines.append(f"  problems ({total}):")
            lines.extend(f"    - {problem}" for problem in self.problems)
            if total > len(self.problems):
                lines.append(f"    ... and {total - len(self.problems)} more")
            lines.append(f"FAILED: {total} problem(s)")
        else:
            lines.append(
                f"OK: {self.shards_checked} shard(s), {self.rows_checked} row(s), "
                f"{self.images_checked} image(s) verified"
            )
        return "\n".join(lines)


@dataclass
class _ShardResult:
    name: str
    problems: Problems
    rows: int = 0
    rows_ok: int = 0
    images_checked: int = 0
    # (key, id, image_index, derived key when it differs from key else None), per row
    identities: list[tuple[str | None, Any, Any, str | None]] = field(default_factory=list)
    error_keys: set[str] = field(default_factory=set)
    # key -> made_from of each ok row: with a spec, checked against what the input asks
    made_from: dict[str, str] = field(default_factory=dict)
    # rows a retry took out: key -> (ordinal, made_from)
    retired: dict[str, tuple[int, str]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# one shard


def _check_schema(name: str, schema: pa.Schema, problems: Problems) -> bool:
    """Problems for missing or mistyped manifest columns; False when rows cannot be checked."""
    missing = [column for column in MANIFEST_COLUMNS if column not in schema.names]
    if missing:
        problems.add(
            f"shard {name}: manifest {manifest_path(name)} lacks column(s) {', '.join(missing)}"
        )
        return False
    for expected in MANIFEST_FIELDS:
        actual = schema.field(expected.name).type
        if actual != expected.type:
            problems.add(
                f"shard {name}: manifest column {expected.name!r} has type {actual}, "
                f"expected {expected.type}"
            )
    return True


def _check_rows(
    name: str,
    rows: list[dict[str, Any]],
    result: _ShardResult,
    constants: dict[str, Any] | None,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], dict[str, str]]:
    """Row-level checks; returns (image member -> row, sidecar member -> row, key -> status)
    for the tar scan."""
    problems = result.problems
    images: dict[str, dict[str, Any]] = {}
    sidecars: dict[str, dict[str, Any]] = {}
    statuses: dict[str, str] = {}
    off_spec: Counter[tuple[str, Any]] = Counter()
    misnamed: dict[Any, list[str | None]] = {}
    for row in rows:
        key, row_id, image_index = row[Col.KEY], row[Col.ID], row[Col.IMAGE_INDEX]
        derived = None
        if key is None or row_id is None or image_index is None:
            problems.add(
                f"shard {name}: a row has a null key, id or image_index "
                f"(key={short(key)}, id={short(row_id)}, image_index={image_index})"
            )
        else:
            expected_key = sample_key(str(row_id), int(image_index))
            if key != expected_key:
                derived = expected_key
                problems.add(
                    f"shard {name}: key {key} does not derive from its id "
                    f"{short(row_id)} and image {image_index} (expected {expected_key})"
                )
        result.identities.append((key, row_id, image_index, derived))
        if row[Col.SHARD] != name:
            misnamed.setdefault(row[Col.SHARD], []).append(key)
        if constants:
            for column, value in constants.items():
                if row[column] != value:
                    off_spec[(column, row[column])] += 1
        status = row[Col.STATUS]
        if key is not None:
            statuses[key] = status
        if status == STATUS_OK:
            result.rows_ok += 1
            if key is not None:
                result.made_from[key] = row[Col.MADE_FROM]
            image_format = row[Col.IMAGE_FORMAT]
            if image_format not in EXTENSIONS:
                problems.add(
                    f"shard {name}: key {key} has unknown image_format {short(image_format)}"
                )
                continue
            member = image_member(key, image_format)
            if row[Col.MEMBER] != member:
                problems.add(
                    f"shard {name}: key {key} names member {short(row[Col.MEMBER])}, "
                    f"expected {member}"
                )
            if not row[Col.SHA256]:
                problems.add(f"shard {name}: ok row {key} has no sha256")
            images[member] = row
            sidecars[sidecar_member(key)] = row
        else:
            if status != STATUS_ERROR:
                problems.add(f"shard {name}: key {key} has unknown status {short(status)}")
            if not row[Col.ERROR] or not str(row[Col.ERROR]).strip():
                problems.add(f"shard {name}: error row {key} has no error message")
            if row[Col.MEMBER] is not None:
                problems.add(
                    f"shard {name}: error row {key} names member "
                    f"{short(row[Col.MEMBER])}; error rows have no image"
                )
    for other, keys in sorted(misnamed.items(), key=lambda item: str(item[0])):
        problems.add(
            f"shard {name}: {len(keys)} row(s) (key {keys[0]}, ...) say shard "
            f"{short(other)}, but their manifest is {manifest_path(name)}"
        )
    for (column, value), count in sorted(off_spec.items(), key=lambda item: str(item[0])):
        expected = constants[column] if constants else None
        problems.add(
            f"shard {name}: {count} row(s) have {column}={short(value)}, the spec says "
            f"{short(expected)}"
        )
    return images, sidecars, statuses


def _check_shard(
    storage: Storage, name: str, constants: dict[str, Any] | None, limit: int
) -> _ShardResult:
    result = _ShardResult(name=name, problems=Problems(limit))
    problems = result.problems
    try:
        data = storage.read_bytes(manifest_path(name))
        manifest = pq.read_table(io.BytesIO(data))
    except FileNotFoundError:
        problems.add(f"shard {name}: manifest {manifest_path(name)} vanished while verifying")
        return result
    except (pa.ArrowException, OSError, ValueError) as exc:
        problems.add(
            f"shard {name}: manifest {manifest_path(name)} is unreadable: "
            f"{type(exc).__name__}: {exc}"
        )
        return result
    result.rows = manifest.num_rows
    output_format = recorded_format(manifest.schema)
    if output_format not in FORMATS:
        problems.add(
            f"shard {name}: its manifest records no known output format ({output_format}); "
            "it was not written by this koala-batch version"
        )
        return result
    shard_format = FORMATS[output_format]
    what, data_path = shard_format.data_kind, shard_format.data_path(name)
    has_data = ShardRecord(output_format, recorded_data_bytes(manifest.schema)).has_data_file
    tar_present = storage.exists(data_path)
    if has_data and not tar_present:
        problems.add(
            f"shard {name}: {what} {data_path} is missing (the manifest lists "
            f"{manifest.num_rows} row(s))"
        )
    if not _check_schema(name, manifest.schema, problems):
        return result
    rows = manifest.select(_ROW_COLUMNS).to_pylist()
    result.retired = retired_rows(manifest.schema)
    del manifest, data
    if rows:
        named = [(row[Col.KEY], row[Col.STATUS], row[Col.MADE_FROM]) for row in rows]
        # A retry retires error rows only.
        named += [(key, STATUS_ERROR, made) for key, (_, made) in result.retired.items()]
        ordinals = [row[Col.ORDINAL] for row in rows]
        ordinals += [ordinal for ordinal, _ in result.retired.values()]
        if all(None not in row for row in named) and None not in ordinals:
            expected_name = shard_name(min(ordinals), named)
            if expected_name != name:
                problems.add(
                    f"shard {name}: its rows would be shard {expected_name} (name from "
                    "the smallest ordinal and the keys): rows were added, removed or "
                    "the manifest was renamed"
                )
    else:
        problems.add(f"shard {name}: manifest {manifest_path(name)} has no rows")
    images, sidecars, statuses = _check_rows(name, rows, result, constants)
    result.error_keys = {key for key, status in statuses.items() if status != STATUS_OK}
    del rows
    if not tar_present:
        if not has_data and images:
            problems.add(
                f"shard {name}: its manifest records no {what} but lists {len(images)} ok image(s)"
            )
        return result

    def scan() -> tuple[Problems, int]:
        return shard_format.scan(storage, ShardToScan(name, images, sidecars, statuses, limit))

    try:
        tar_problems, decoded = with_retries(scan, f"read {storage.url(data_path)}")
    except FileNotFoundError:
        problems.add(f"shard {name}: {what} {data_path} vanished while verifying")
        return result
    except (tarfile.TarError, EOFError, OSError, pa.ArrowException) as exc:
        problems.add(f"shard {name}: {what} {data_path} is unreadable: {type(exc).__name__}: {exc}")
        return result
    problems.merge(tar_problems)
    result.images_checked = decoded
    return result


# ---------------------------------------------------------------------------------------
# the whole output


def _read_json(storage: Storage, relative: str, problems: Problems) -> dict[str, Any] | None:
    try:
        record = json.loads(storage.read_bytes(relative))
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as exc:
        problems.add(f"{relative} is unreadable: {type(exc).__name__}: {exc}")
        return None
    if not isinstance(record, dict):
        problems.add(f"{relative} is not a JSON object")
        return None
    return record


def _check_success(
    record: dict[str, Any],
    shard_rows: dict[str, tuple[int, int]],
    spec: JobSpec | None,
    problems: Problems,
) -> None:
    """_SUCCESS against the committed shards: {shard: (rows, ok rows)}."""
    listed_entries = record.get("shards")
    counts = record.get("counts")
    if not isinstance(listed_entries, list) or not isinstance(counts, dict):
        problems.add(f"{SUCCESS_FILE} is not a job record (no 'shards' list or 'counts')")
        return
    listed: dict[str, Any] = {}
    for entry in listed_entries:
        shard = entry.get("shard") if isinstance(entry, dict) else None
        if not isinstance(shard, str):
            problems.add(f"{SUCCESS_FILE} has a shard entry without a name: {short(entry)}")
            continue
        listed[shard] = entry
    for shard in sorted(set(listed) - set(shard_rows)):
        problems.add(
            f"{SUCCESS_FILE} lists shard {shard}, which is not committed (no "
            f"{manifest_path(shard)})"
        )
    for shard in sorted(set(shard_rows) - set(listed)):
        problems.add(f"shard {shard} is committed but not listed in {SUCCESS_FILE}")
    for shard in sorted(set(listed) & set(shard_rows)):
        rows = listed[shard].get("rows")
        if rows is not None and rows != shard_rows[shard][0]:
            problems.add(
                f"{SUCCESS_FILE} says shard {shard} has {rows} row(s), its manifest has "
                f"{shard_rows[shard][0]}"
            )
    total = sum(rows for rows, _ in shard_rows.values())
    ok = sum(ok for _, ok in shard_rows.values())
    expected_counts = {
        "images_committed": total,
        "images_ok": ok,
        "images_failed": total - ok,
        "shards": len(shard_rows),
    }
    for name, value in expected_counts.items():
        if (name == "images_committed" or name in counts) and counts.get(name) != value:
            problems.add(
                f"{SUCCESS_FILE} counts {name}={short(counts.get(name))}, the "
                f"manifests hold {value}"
            )
    if spec is not None and record.get("fingerprint") not in (None, spec.fingerprint()):
        problems.add(
            f"{SUCCESS_FILE} records a job with another fingerprint than the spec's: "
            "this output was made by a different spec"
        )


def _track_identity(
    key: str | None,
    row_id: Any,
    image_index: Any,
    derived: str | None,
    index: int,
    names: list[str],
    owner: dict[str, int],
    pairs: dict[str, int],
    problems: Problems,
    failed: set[str] | None = None,
) -> None:
    """Record one manifest row's key and (id, image_index); report repeats of either.
    `failed`: the keys seen so far with an error row."""
    if key is None:
        return
    if key in owner:
        first = names[owner[key]]
        where = (
            f"twice in shard {first}"
            if first == names[index]
            else f"in shard {first} and shard {names[index]}"
        )
        if failed and key in failed and first != names[index]:
            where += (
                ", one of them an error row: a retry of failed images was cut short; "
                "`koala-batch run` on the spec (a resume, or `run --retry-failed`) keeps "
                "the newer row and takes the other out of its manifest"
            )
        problems.add(f"key {key} (id {short(row_id)}, image {image_index}) appears {where}")
    else:
        owner[key] = index
    if row_id is None or image_index is None:
        return
    # A key that derives from its pair stands for the pair, so among such rows a repeated
    # pair is a repeated key, reported just above, and `owner` serves as their pair map.
    # A key that does not derive (itself a problem) files its pair in `pairs`, under the
    # key the pair should have had.
    if derived is None:
        clash = pairs.get(key)
    else:
        clash = pairs.get(derived)
        if clash is None:
            clash = owner.get(derived)
        pairs.setdefault(derived, index)
    if clash is not None:
        problems.add(
            f"id {short(row_id)} image {image_index} appears in shard {names[clash]} "
            f"and shard {names[index]} under different keys"
        )


def _expected_images(spec: JobSpec, input_filesystem: Any | None, workers: int, output_uri: str):
    """Yield (key, source, row_index, id, image_index, made_from) of every image the input
    plans.

    An input that can reach the output being verified is refused, as `run` refuses it:
    its expected images would include the output's own manifests."""
    plan = plan_input(
        spec.input,
        input_filesystem,
        output_uri,
        images_per_prompt=spec.generation.images_per_prompt,
    )
    columns = (Col.KEY, Col.SOURCE, Col.ROW_INDEX, Col.ID, Col.IMAGE_INDEX, Col.MADE_FROM)
    for table in planned_images(spec, plan, columns, input_filesystem, workers):
        yield from zip(*(table.column(c).to_pylist() for c in columns), strict=True)


def verify_output(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    *,
    spec: JobSpec | None = None,
    filesystem: Any | None = None,
    max_problems_listed: int = 50,
    input_filesystem: Any | None = None,
    workers: int = 8,
) -> VerifyReport:
    """Check every committed shard under `uri`; with `spec`, also that the input is covered.

    `storage_options` default to the spec's output storage options when a spec is given.
    `filesystem` / `input_filesystem` replace the filesystems built from the URLs (tests).
    Input problems with a spec (no such file, bad schema, duplicate ids, a damaged row
    group) raise `koala_batch.errors.InputError`, and an input that can reach `uri`
    raises `SpecError`, as they do for `run`.
    """
    if storage_options is None and spec is not None:
        storage_options = reveal_storage_options(spec.output.storage_options)
    storage = Storage(uri, storage_options, filesystem)
    report = VerifyReport(output=storage.url(""))
    problems = Problems(max_problems_listed)

    listing = list_output(storage)
    names = list(listing.committed)
    report.leftovers = sorted(f"{relative} ({why})" for relative, why in listing.leftovers)
    job_present = listing.has_job_file
    report.success_present = listing.has_success
    job_record = _read_json(storage, JOB_FILE, problems) if job_present else None
    success = _read_json(storage, SUCCESS_FILE, problems) if report.success_present else None
    if not (names or job_present or report.success_present or report.leftovers):
        if not storage.exists(""):
            problems.add(f"output {storage.url('')} does not exist")
        else:
            problems.add(
                f"output {storage.url('')} is not a koala-batch output "
                f"(no {JOB_FILE}, no {MANIFESTS_DIR}/)"
            )
    elif not job_present:
        report.notes.append(f"no {JOB_FILE}: a run cannot resume this output")
    for relative in listing.foreign:
        # Not a leftover: no run removes it, and `run` refuses the whole prefix for it.
        problems.add(
            f"{relative} is a file koala-batch did not write; `run` refuses an output "
            "holding one: move it out of the output"
        )
    if not report.success_present:
        report.notes.append(f"no {SUCCESS_FILE}: the job has not finished (or is running)")
    if listing.leases:
        report.notes.append(
            f"{listing.leases[-1]}: a run holds this output's lease; it may be writing now "
            "(or it died, and the next run takes the output over)"
        )
    if job_record is not None and job_record.get("format") != JOB_FILE_FORMAT:
        problems.add(
            f"{JOB_FILE} records job-file format {job_record.get('format')}: this output was "
            f"made by another koala-batch version (this one reads format {JOB_FILE_FORMAT}); "
            "verify it with that version, or regenerate it with --overwrite"
        )
    elif (
        spec is not None
        and job_record is not None
        and job_record.get("fingerprint") != spec.fingerprint()
    ):
        problems.add(
            f"{JOB_FILE} records a job with another fingerprint than the spec's: "
            "this output was made by a different spec"
        )

    constants = spec.spec_constants() if spec is not None else None

    # Every manifest key -> index of its shard in `names` (shared int objects: the map
    # costs little beyond the keys); see _track_identity for `pairs`.
    owner: dict[str, int] = {}
    pairs: dict[str, int] = {}
    shard_ids = list(range(len(names)))
    shard_rows: dict[str, tuple[int, int]] = {}
    failed_keys: set[str] = set()
    retired_by: dict[str, str] = {}  # key -> the shard whose manifest a retry rewrote
    made_from: dict[str, str] = {}  # key -> what its ok image was made from
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = bounded_map(
            pool,
            lambda name: _check_shard(storage, name, constants, max_problems_listed),
            names,
            2 * max(1, workers),
        )
        for index, result in zip(shard_ids, results, strict=True):
            report.shards_checked += 1
            report.rows_checked += result.rows
            report.rows_ok += result.rows_ok
            report.images_checked += result.images_checked
            shard_rows[result.name] = (result.rows, result.rows_ok)
            problems.merge(result.problems)
            failed_keys |= result.error_keys
            made_from.update(result.made_from)
            retired_by.update(dict.fromkeys(result.retired, result.name))
            for key, row_id, image_index, derived in result.identities:
                _track_identity(
                    key,
                    row_id,
                    image_index,
                    derived,
                    index,
                    names,
                    owner,
                    pairs,
                    problems,
                    failed_keys,
                )
            result.identities.clear()
    report.rows_failed = report.rows_checked - report.rows_ok
    for key, shard in sorted(retired_by.items()):
        if key not in owner:
            problems.add(
                f"shard {shard}: a retry took the error row of key {key} out of its manifest, "
                "but no manifest holds that key now; rerun `koala-batch run` on the spec to "
                "generate it"
            )

    if success is not None:
        _check_success(success, shard_rows, spec, problems)
        cost = success.get("cost")
        report.cost = cost if isinstance(cost, dict) else None

    if spec is not None:
        matched: set[str] = set()
        expected_count = 0
        for key, source, row_index, row_id, image_index, made in _expected_images(
            spec, input_filesystem, max(1, workers), uri
        ):
            expected_count += 1
            if key in owner:
                matched.add(key)
                if made_from.get(key, made) != made:
                    report.changed_inputs += 1
                    problems.add(
                        f"input row {source} row {row_index} (id {short(row_id)}) image "
                        f"{image_index} has changed since its image was generated (key {key}): "
                        "the committed image is of the row as it was"
                    )
            else:
                report.missing_inputs += 1
                problems.add(
                    f"input row {source} row {row_index} (id {short(row_id)}) image "
                    f"{image_index} is missing (key {key})"
                )
        report.expected_images = expected_count
        unexpected = [(key, index) for key, index in owner.items() if key not in matched]
        if spec.output.accumulate:
            report.kept_images = len(unexpected)
        else:
            for key, index in unexpected:
                problems.add(
                    f"shard {names[index]}: unexpected key {key}: the spec's input plans no "
                    "such image (an output that keeps the images of earlier inputs needs "
                    "output.accumulate: true)"
                )

    report.problems = problems.listed
    report.problems_total = problems.total
    return report
