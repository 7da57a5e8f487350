"""The commit protocol around the write stage: claim the output, resume, record success.

- `claim_output` writes `_job.json` (the fingerprint of what decides the images) before
  anything else, and refuses an output prefix that holds another job or foreign files.
- `load_committed` reads the committed manifests: their keys are skipped on resume.
- `retire_superseded_rows` and `release_failed`: a retry of the failed images (below).
- `remove_leftovers` deletes what a write cut short (data without a manifest, partials).
- `build_job_record` and `write_success` write `_SUCCESS`, the job record, last.

What a committed shard is, and where each file lives: `layout.py`.

Retrying failed images (`run --retry-failed`). Error rows have no image data in any
format, so a key whose error row is retried simply leaves the committed key set: it is
generated again, into a new shard, by the normal graph. Then the old shard's manifest is
rewritten without that row (one PUT of a file of the same name, atomic on every store;
its data files are untouched), or uncommitted if no row is left. A run cut short between
the two leaves such a key with two rows in two committed shards; `newest_row` says which
one stands, and every resume retires the others (`retire_superseded_rows`) before anything
else, so `_SUCCESS` only ever describes an output where every key has exactly one row.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from koala_batch.errors import OutputConflictError, OutputUnwritableError, RunSupersededError
from koala_batch.keys import KeySet, key_digest, made_from_bytes
from koala_batch.output.formats import shard_damage
from koala_batch.output.layout import (
    JOB_FILE,
    MANIFESTS_DIR,
    SHARDS_DIR,
    SUCCESS_FILE,
    OutputListing,
    is_claim_file,
    list_output,
    manifest_path,
    recorded_stats,
    shard_data_files,
    shard_folder,
    shard_record,
    stats_metadata,
    summary_from_manifest,
)
from koala_batch.output.stats import as_failures, job_totals, shard_stats
from koala_batch.schemas import RUN_FIELDS, STATUS_OK, Col
from koala_batch.spec import JobSpec
from koala_batch.storage import Storage

logger = logging.getLogger(__name__)

# 2: manifests record what each image was made from (`schemas.Col.MADE_FROM`).
# 3: every manifest records its shard's format and data size (`layout.data_metadata`);
#    the fingerprint covers every generation setting and the format, set or not.
JOB_FILE_FORMAT = 3


@dataclass
class CommittedState:
    """What earlier runs committed to an output: per-shard stats and every key, and the
    committed shards that cannot be trusted (`damaged`: name -> why, and `damaged_keys`,
    the keys of those whose manifest reads), left out of both.

    `failed`: the keys whose standing row is an error row, and its shard. `superseded`:
    per shard, the keys of its rows that another shard's newer row of the same key
    replaces (a retry cut short); `retire_superseded_rows` takes them out.
    """

    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    keys: KeySet = field(default_factory=KeySet)
    damaged: dict[str, str] = field(default_factory=dict)
    # The keys of each damaged shard whose manifest still reads.
    damaged_keys: dict[str, list[str]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    superseded: dict[str, list[str]] = field(default_factory=dict)

    @property
    def images(self) -> int:
        """Committed images: keys, not rows (a key committed twice counts once)."""
        return len(self.keys)

    @property
    def rows(self) -> int:
        """Committed manifest rows (more than `images` while rows are superseded)."""
        return sum(shard["rows"] for shard in self.shards.values())


# Libraries whose upgrade can move pixels by a few levels without changing the spec.
PIXEL_LIBRARIES = ("torch", "diffusers", "transformers")


def package_versions(
    names: tuple[str, ...] = (
        "koala-batch",
        "ray",
        "torch",
        "diffusers",
        "transformers",
        "pyarrow",
        "fsspec",
        "s3fs",
        "pydantic",
        "pillow",
        "numpy",
    ),
) -> dict[str, str]:
    """Installed versions of the named distributions (those not installed are left out)."""
    versions = {}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def job_file_contents(spec: JobSpec, run_id: str | None = None) -> dict[str, Any]:
    """What `_job.json` holds: the fingerprint, what it covers, the owning run."""
    return {
        "format": JOB_FILE_FORMAT,
        "koala_batch_version": package_versions(("koala-batch",)).get(
            "koala-batch", "0.0.0+unknown"
        ),
        "fingerprint": spec.fingerprint(),
        "determined_by": spec.fingerprint_fields(),
        # Not in the fingerprint (an upgrade must not block a resume), but a resume under
        # other versions says so: its images may differ from the committed ones.
        "versions": package_versions(PIXEL_LIBRARIES),
        # The run that owns the output now: writers of an earlier run, still alive after
        # their driver was killed, see another id and stop before committing.
        "run_id": run_id,
    }


def version_changes(previous_job: dict[str, Any]) -> list[str]:
    """'torch 2.12.0 -> 2.13.0' for each pixel library whose version differs from the
    one `_job.json` recorded (nothing for a `_job.json` that recorded none)."""
    before = previous_job.get("versions")
    if not isinstance(before, dict):
        return []
    now = package_versions(PIXEL_LIBRARIES)
    return [
        f"{name} {before[name]} -> {now.get(name, 'not installed')}"
        for name in PIXEL_LIBRARIES
        if name in before and before[name] != now.get(name)
    ]


@dataclass(frozen=True)
class OutputState:
    """What a run would do with an output prefix, and what is there now."""

    action: str  # "new", "resume" or "overwrite"
    listing: OutputListing
    previous_job: dict[str, Any] | None = None  # the `_job.json` a resume continues


def check_output(storage: Storage, spec: JobSpec, overwrite: bool = False) -> OutputState:
    """Read-only: what a run would do with the output prefix.

    Refuses (OutputConflictError) a prefix holding files koala-batch did not write, or the
    output of a job whose images would differ (another fingerprint) unless `overwrite`
    is set.
    """
    try:
        listing = list_output(storage)
    except PermissionError as exc:
        raise OutputConflictError(f"output {storage.url('')}: access denied ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - unreachable endpoint, bad config, ...
        raise OutputConflictError(
            f"output {storage.url('')}: cannot list it ({type(exc).__name__}: {exc})"
        ) from None
    if listing.foreign and storage.is_file(""):
        raise OutputUnwritableError(
            f"output {storage.url('')} is a file, not a directory (prefix); choose a "
            "directory for output.uri. Nothing was written."
        )
    if listing.foreign:
        foreign = listing.foreign
        listed = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise OutputConflictError(
            f"output {storage.url('')} holds files koala-batch did not write ({listed}); "
            "choose an empty or new output prefix. Nothing was written."
        )
    if overwrite:
        return OutputState("overwrite" if listing.files else "new", listing)
    if not listing.has_job_file:
        # A `_job.json` write cut short (or a `validate` probe left behind) is no job yet,
        # nor is a lease with the write-aside of another run racing for it.
        if not all(is_claim_file(relative) for relative in listing.files):
            raise OutputConflictError(
                f"output {storage.url('')} holds koala-batch files but no {JOB_FILE}; choose a "
                "new output prefix or pass --overwrite"
            )
        return OutputState("new", listing)
    try:
        existing = json.loads(storage.read_bytes(JOB_FILE))
    except (ValueError, OSError) as exc:
        raise OutputConflictError(
            f"output {storage.url(JOB_FILE)} is unreadable ({exc}); choose a new output "
            "prefix or pass --overwrite"
        ) from None
    if existing.get("format") != JOB_FILE_FORMAT:
        raise OutputConflictError(
            f"output {storage.url('')} was made by another koala-batch version (job-file "
            f"format {existing.get('format')}, this one resumes format {JOB_FILE_FORMAT}), "
            "whose manifests cannot say what each image was made from; write to a new "
            "output prefix, or pass --overwrite to regenerate it"
        )
    if existing.get("fingerprint") != spec.fingerprint():
        theirs = existing.get("determined_by", {})
        ours = spec.fingerprint_fields()
        changed = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise OutputConflictError(
            f"output {storage.url('')} holds a job whose images would differ from this spec "
            f"(changed: {', '.join(changed) or 'format'}); resuming would mix them. Write to a "
            "new output prefix, or pass --overwrite (output.overwrite: true) to delete that "
            "job's output first."
        )
    return OutputState("resume", listing, previous_job=existing)


def claim_output(
    storage: Storage, spec: JobSpec, overwrite: bool = False, run_id: str | None = None
) -> bool:
    """Make the output prefix this job's; True when an earlier run of the same job is resumed.

    Checks it first (`check_output`); `overwrite` deletes koala-batch's own files, never
    others. Then writes `_job.json` with this run's id: create-only on a prefix without
    one, so of two runs started together on a new output exactly one gets it. A resume
    takes the output over from the run before (whose writers then stop). `_SUCCESS` is
    left alone: the run removes it once it has something to change.
    """
    state = check_output(storage, spec, overwrite)
    # A missing bucket or a file in the way fails here, naming the output, not mid-run.
    storage.check_writable(JOB_FILE)
    if state.action == "overwrite":
        for relative in state.listing.own_files:
            storage.remove(relative)
        remove_emptied_shard_folders(storage, list(state.listing.own_files))
    if state.previous_job is not None:
        changes = version_changes(state.previous_job)
        if changes:
            logger.warning(
                "resuming an output made with other library versions (%s): images "
                "generated now may differ from the committed ones by a few levels",
                ", ".join(changes),
            )
    contents = json.dumps(job_file_contents(spec, run_id), indent=2).encode()
    if state.action == "resume":
        storage.write_bytes(JOB_FILE, contents)
    elif not storage.create_exclusive(JOB_FILE, contents):
        raise OutputConflictError(
            f"output {storage.url('')} was claimed by another run while this one started "
            "(two runs on one output at once); let that run finish, then rerun this spec to "
            "resume"
        )
    return state.action == "resume"


def load_committed(storage: Storage, listing: OutputListing | None = None) -> CommittedState:
    """Committed shards (those with a manifest), their keys and their failed keys.

    Each shard is checked as cheaply as a listing allows: its manifest must read and its
    data (tar, Parquet file, or folder of images) exist with the sizes the manifest records
    (`formats.shard_damage`). One that fails is `damaged`, not
    committed: `uncommit` it and its rows are generated again.

    A key with rows in several shards (a retry cut short) is committed once: `newest_row`
    picks the row that stands, the others are `superseded`. Two ok rows of one key (an
    image committed twice, which no retry makes) are refused.
    """
    listing = listing or list_output(storage)

    def read(shard: str) -> tuple[str, pa.Table | None, str | None]:
        data = storage.read_bytes(manifest_path(shard))
        columns = [Col.KEY, Col.STATUS, Col.BYTES, Col.ORDINAL, Col.MEMBER, Col.MADE_FROM]
        try:
            manifest = pq.read_table(io.BytesIO(data), columns=columns)
        except (pa.ArrowException, KeyError) as exc:
            return shard, None, f"its manifest is unreadable ({type(exc).__name__}: {exc})"
        return shard, manifest, shard_damage(listing, shard, shard_record(manifest))

    shards: dict[str, dict[str, Any]] = {}
    damaged: dict[str, str] = {}
    damaged_keys: dict[str, list[str]] = {}
    rows: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = {}  # keys, digests, made_from
    error_rows: list[tuple[str, str]] = []  # (key, shard): few, unless the job failed
    with ThreadPoolExecutor(max_workers=8) as pool:
        for shard, manifest, damage in pool.map(read, listing.committed):
            if damage is not None or manifest is None:
                damaged[shard] = damage or "its manifest is unreadable"
                if manifest is not None:
                    damaged_keys[shard] = manifest.column(Col.KEY).to_pylist()
                continue
            keys = manifest.column(Col.KEY).to_pylist()
            made = made_from_bytes(manifest.column(Col.MADE_FROM).to_pylist())
            digests = np.array([key_digest(key) for key in keys], dtype="S16")
            rows[shard] = (keys, digests, np.array(made, dtype="S16"))
            errors = pc.not_equal(manifest.column(Col.STATUS), STATUS_OK)
            if pc.any(errors).as_py():
                failing = manifest.filter(errors).column(Col.KEY).to_pylist()
                error_rows.extend((key, shard) for key in failing)
            shards[shard] = summary_from_manifest(storage, shard, manifest)
    everything = [digests for _, digests, _ in rows.values()]
    superseded: dict[str, list[str]] = {}
    if everything:
        unique, counts = np.unique(np.concatenate(everything), return_counts=True)
        if (counts > 1).any():
            superseded = _superseded_rows(storage, list(rows), everything, unique[counts > 1])
    losers = {(key, shard) for shard, lost in superseded.items() for key in lost}
    failed = {key: shard for key, shard in error_rows if (key, shard) not in losers}
    return CommittedState(
        shards=shards,
        keys=_standing_keys(rows, superseded),
        damaged=damaged,
        damaged_keys=damaged_keys,
        failed=failed,
        superseded=superseded,
    )


def _standing_keys(
    rows: dict[str, tuple[list[str], np.ndarray, np.ndarray]], superseded: dict[str, list[str]]
) -> KeySet:
    """The committed keys, each with the `made_from` of the row that stands for it."""
    digests, made = [], []
    for shard, (keys, shard_digests, shard_made) in rows.items():
        lost = set(superseded.get(shard, ()))
        keep = np.array([key not in lost for key in keys], dtype=bool) if lost else slice(None)
        digests.append(shard_digests[keep])
        made.append(shard_made[keep])
    if not digests:
        return KeySet(made_from=np.empty(0, "S16"))
    return KeySet(np.concatenate(digests), np.concatenate(made))


def damage_beyond_input(committed: CommittedState, planned: KeySet) -> dict[str, str]:
    """The damaged shards that a run planning `planned` cannot make again (shard -> why):
    those holding images of rows the input no longer has (`output.accumulate`), and those
    whose manifest is unreadable, as nobody can tell which rows they held."""
    beyond = {}
    for shard, why in sorted(committed.damaged.items()):
        keys = committed.damaged_keys.get(shard)
        if keys is None:
            beyond[shard] = f"{why}; which rows it held is unknown"
            continue
        gone = len(keys) - int(planned.contains_many(keys).sum())
        if gone:
            beyond[shard] = f"{why}; {gone} of its {len(keys)} images are of rows not in the input"
    return beyond


@dataclass(frozen=True)
class RowVersion:
    """One committed row of a key: its shard, whether it is ok, when it was generated
    (unix seconds; None for a manifest written before it said)."""

    shard: str
    ok: bool
    generated_at: float | None = None


def newest_row(rows: list[RowVersion]) -> RowVersion:
    """The row that stands for a key committed more than once, the one rule: an ok row
    beats an error row; among rows of one status, the one generated later; then (a
    manifest that does not say when) the larger shard name, so every run picks the same."""
    return max(
        rows,
        key=lambda row: (
            row.ok,
            row.generated_at if row.generated_at is not None else float("-inf"),
            row.shard,
        ),
    )


def _generated_at(manifest: pa.Table) -> list[float | None]:
    if Col.GENERATED_AT not in manifest.column_names:
        return [None] * manifest.num_rows
    column = manifest.column(Col.GENERATED_AT)
    if pa.types.is_timestamp(column.type):
        return [None if moment is None else moment.timestamp() for moment in column.to_pylist()]
    return [None if moment is None else float(moment) for moment in column.to_pylist()]


def _superseded_rows(
    storage: Storage, names: list[str], digests: list[np.ndarray], repeated: np.ndarray
) -> dict[str, list[str]]:
    """Per shard, the keys of its rows that `newest_row` puts aside, given the digests of
    the keys committed more than once. Reads again only the shards holding such keys."""
    holders = [
        name
        for name, shard_digests in zip(names, digests, strict=True)
        if np.isin(shard_digests, repeated).any()
    ]
    wanted = set(repeated.tolist())

    def versions_of(shard: str) -> list[tuple[str, RowVersion]]:
        data = io.BytesIO(storage.read_bytes(manifest_path(shard)))
        names = pq.read_schema(data).names
        data.seek(0)
        columns = [Col.KEY, Col.STATUS, *([Col.GENERATED_AT] if Col.GENERATED_AT in names else [])]
        manifest = pq.read_table(data, columns=columns)
        rows = zip(
            manifest.column(Col.KEY).to_pylist(),
            manifest.column(Col.STATUS).to_pylist(),
            _generated_at(manifest),
            strict=True,
        )
        return [
            (key, RowVersion(shard, status == STATUS_OK, moment))
            for key, status, moment in rows
            if key_digest(key) in wanted
        ]

    versions: dict[str, list[RowVersion]] = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        for found in pool.map(versions_of, holders):
            for key, row in found:
                versions.setdefault(key, []).append(row)
    conflicting: set[str] = set()
    superseded: dict[str, list[str]] = {}
    for key, rows in sorted(versions.items()):
        shards = [row.shard for row in rows]
        if len(set(shards)) != len(shards) or sum(row.ok for row in rows) > 1:
            # Twice in one shard, or two images: no retry does this, and retiring an ok row
            # would leave its image in the data files.
            conflicting.update(shards)
            continue
        standing = newest_row(rows)
        for row in rows:
            if row is not standing:
                superseded.setdefault(row.shard, []).append(key)
    if conflicting:
        raise OutputConflictError(
            f"committed manifests under {storage.url(MANIFESTS_DIR)} repeat keys "
            f"({', '.join(sorted(conflicting)[:4])} share some); run `koala-batch verify` on "
            "the output"
        )
    return superseded


def check_owner(storage: Storage, run_id: str | None) -> None:
    """Raise RunSupersededError if `_job.json` names another run than `run_id` (None: no
    check): what fences the writes of a run that another has taken the output from."""
    if run_id is None:
        return
    owner = json.loads(storage.read_bytes(JOB_FILE)).get("run_id")
    if owner != run_id:
        raise RunSupersededError(
            f"output {storage.url('')} now belongs to run {owner}, not {run_id}"
        )


# Manifest metadata of a shard whose manifest a retry rewrote: the rows it retired, as a
# JSON list of [key, ordinal, made_from], so that its name (from all the rows it was
# written with) can still be checked.
RETIRED_ROWS_METADATA = b"koala_batch.retired_rows"


def retired_rows(schema: pa.Schema) -> dict[str, tuple[int, str]]:
    """key -> (ordinal, made_from) of the (error) rows a retry took out of a manifest."""
    value = (schema.metadata or {}).get(RETIRED_ROWS_METADATA)
    if not value:
        return {}
    return {key: (int(ordinal), str(made)) for key, ordinal, made in json.loads(value)}


def rewrite_without(storage: Storage, shard: str, keys: set[str], run_id: str | None) -> bool:
    """Rewrite a committed shard's manifest without the (error) rows of `keys`, keeping its
    metadata, or uncommit the shard if no row is left; True if it is still committed.

    Error rows have no image data, so the data files stay as they are; the manifest is
    replaced by one PUT of the same name. The owner of the output is checked right before.
    """
    manifest = pq.read_table(io.BytesIO(storage.read_bytes(manifest_path(shard))))
    retire = pc.is_in(manifest.column(Col.KEY), value_set=pa.array(sorted(keys), pa.string()))
    retiring = manifest.filter(retire)
    if retiring.num_rows == 0:
        return True
    if STATUS_OK in retiring.column(Col.STATUS).to_pylist():
        raise OutputConflictError(
            f"shard {storage.url(manifest_path(shard))}: an ok row was to be retired, but its "
            "image is in the shard's data; run `koala-batch verify` on the output"
        )
    kept = manifest.filter(pc.invert(retire))
    check_owner(storage, run_id)
    if kept.num_rows == 0:
        uncommit(storage, [shard])
        return False
    metadata = dict(manifest.schema.metadata or {})
    retired = retired_rows(manifest.schema)
    for key, ordinal, made in zip(
        retiring.column(Col.KEY).to_pylist(),
        retiring.column(Col.ORDINAL).to_pylist(),
        retiring.column(Col.MADE_FROM).to_pylist(),
        strict=True,
    ):
        retired[key] = (ordinal, made)
    listed = [[key, ordinal, made] for key, (ordinal, made) in sorted(retired.items())]
    metadata[RETIRED_ROWS_METADATA] = json.dumps(listed).encode()
    stats = recorded_stats(manifest.schema)
    if stats is not None:
        # Counts follow the rows; seconds and moments stay: they were spent all the same.
        recount = shard_stats(kept)
        stats.update({name: recount[name] for name in _ROW_COUNTS if name in recount})
        metadata.update(stats_metadata(stats))
    buffer = io.BytesIO()
    pq.write_table(kept.replace_schema_metadata(metadata), buffer, compression="zstd")
    storage.write_bytes(manifest_path(shard), buffer.getvalue())
    return True


# The shard stats that count its rows (recomputed when a retry retires some).
_ROW_COUNTS = ("rows", "ok", "errors", "failures", "image_bytes")


@dataclass(frozen=True)
class RetiredRows:
    """What `retire_superseded_rows` did: rows taken out, manifests rewritten, shards
    uncommitted because no row was left."""

    rows: int = 0
    rewritten: tuple[str, ...] = ()
    uncommitted: tuple[str, ...] = ()


def retire_superseded_rows(
    storage: Storage, superseded: dict[str, list[str]], run_id: str | None
) -> RetiredRows:
    """Take every superseded row (`CommittedState.superseded`) out of its shard's manifest
    (`rewrite_without`), so that each key has exactly one committed row."""

    def retire(item: tuple[str, list[str]]) -> tuple[str, bool]:
        shard, keys = item
        return shard, rewrite_without(storage, shard, set(keys), run_id)

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(retire, sorted(superseded.items())))
    return RetiredRows(
        rows=sum(len(keys) for keys in superseded.values()),
        rewritten=tuple(shard for shard, kept in outcomes if kept),
        uncommitted=tuple(shard for shard, kept in outcomes if not kept),
    )


def retriable_failures(committed: CommittedState, planned: KeySet | None) -> dict[str, str]:
    """The failed keys a retry can generate again (key -> shard): all of them, or with
    `planned` (an accumulating output, `output.accumulate`) those the input still plans;
    the others have no input row left to generate them from."""
    if planned is None:
        return dict(committed.failed)
    keys = list(committed.failed)
    present = planned.contains_many(keys)
    return {key: committed.failed[key] for key, keep in zip(keys, present, strict=True) if keep}


def release_failed(
    committed: CommittedState, retrying: dict[str, str] | None = None
) -> CommittedState:
    """The committed state a retry of the failed images starts from: their keys are no
    longer committed, so the graph generates them again into new shards.

    `retrying` (key -> shard, default: every failed key) limits the retry
    (`retriable_failures`). Nothing is removed here: every error row stays committed until
    its key's new row is (a retry cut short leaves the key with two rows, and the next
    run keeps the newer one: `newest_row`, `settle_retries`). A new shard of the same
    keys as an old one gets another name (`keys.shard_name` hashes each row's status
    and what it was made from), so it commits beside it. Expects no superseded rows
    (`retire_superseded_rows` first).
    """
    if committed.superseded:
        raise ValueError("release_failed: retire the superseded rows first")
    if retrying is None:
        retrying = committed.failed
    return CommittedState(
        shards=dict(committed.shards),
        keys=committed.keys.difference(KeySet.from_keys(retrying)),
        damaged=dict(committed.damaged),
        failed={key: shard for key, shard in committed.failed.items() if key not in retrying},
    )


def uncommit(storage: Storage, shards: list[str]) -> None:
    """Take shards out of the output: manifest first (the commit marker), then its data
    (tar, Parquet file or folder), so that a cut at any point leaves at worst a leftover,
    never a committed half."""
    for shard in shards:
        storage.remove(manifest_path(shard))
        for relative in shard_data_files(storage, shard):
            storage.remove(relative)
        storage.remove_empty_folder(shard_folder(shard))


def retire_late_duplicates(storage: Storage, known: set[str]) -> list[str]:
    """Uncommit shards that appeared during this run from outside it and duplicate its rows.

    A writer of a killed run can outlive its driver by a moment and commit a shard after
    this run read the committed state; this run then generated those rows again. Such a
    late shard is retired (manifest first, then tar) when every one of its keys is
    committed by another shard. Returns the retired shard names.
    """
    names = set(list_output(storage).committed)
    late = sorted(names - known)
    if not late:
        return []

    def keys_of(shard: str) -> tuple[str, list[str]]:
        data = storage.read_bytes(manifest_path(shard))
        return shard, pq.read_table(io.BytesIO(data), columns=[Col.KEY]).column(Col.KEY).to_pylist()

    with ThreadPoolExecutor(max_workers=8) as pool:
        keys = dict(pool.map(keys_of, sorted(names)))
    owned = set().union(*(keys[name] for name in names if name not in late))
    retired = []
    for shard in late:
        if not set(keys[shard]) <= owned:
            raise OutputConflictError(
                f"shard {storage.url(manifest_path(shard))} was committed by another process "
                "during this run and holds images this run did not produce; is another job "
                "writing to this output? Run `koala-batch verify` on it"
            )
        uncommit(storage, [shard])
        retired.append(shard)
    return retired


def remove_leftovers(storage: Storage, listing: OutputListing | None = None) -> list[str]:
    """Delete data without a manifest and half-written files; return what was removed."""
    removed = []
    for relative, _ in (listing or list_output(storage)).leftovers:
        storage.remove(relative)
        removed.append(relative)
    remove_emptied_shard_folders(storage, removed)
    return removed


def remove_emptied_shard_folders(storage: Storage, removed: list[str]) -> None:
    """Remove the files-format shard folders that the removal of `removed` left empty."""
    for folder in sorted({posixpath.dirname(relative) for relative in removed}):
        if posixpath.dirname(folder) == SHARDS_DIR:
            storage.remove_empty_folder(folder)


def commit_timeline(started: float, written: list[dict[str, Any]]) -> dict[str, Any]:
    """How this run's commits kept up with generation (seconds since `started`).

    `max_uncommitted_images` is the most images generated but not yet committed at any
    moment: what a crash at the worst time would have cost.
    """
    events: list[tuple[float, int]] = []
    for shard in written:
        generated = shard.get("generated_at") or []
        if shard.get("committed_at") is None:
            continue
        events.extend((moment, 1) for moment in generated)
        events.append((shard["committed_at"], -len(generated)))
    if not events:
        return {"shards_committed": 0}
    # At equal moments an image counts as generated before its shard commits.
    events.sort(key=lambda event: (event[0], -event[1]))
    uncommitted = peak = 0
    for _, change in events:
        uncommitted += change
        peak = max(peak, uncommitted)
    commits = [moment for moment, change in events if change <= 0]
    images = [moment for moment, change in events if change > 0]

    def since_start(moment: float) -> float:
        return round(moment - started, 3)

    return {
        "shards_committed": len(commits),
        "first_image_s": since_start(min(images)) if images else None,
        "last_image_s": since_start(max(images)) if images else None,
        "first_commit_s": since_start(min(commits)),
        "last_commit_s": since_start(max(commits)),
        "max_uncommitted_images": peak,
    }


def build_job_record(
    spec: JobSpec,
    *,
    started_at: str,
    finished_at: str,
    wall_time_s: float,
    resumed: bool,
    input_files: int,
    input_rows: int,
    planned_images: int,
    shards: dict[str, dict[str, Any]],
    written_this_run: int,
    timeline: dict[str, Any] | None = None,
    generators: dict[str, Any] | None = None,
    retried: int = 0,
    retried_ok: int = 0,
    kept: int = 0,
) -> dict[str, Any]:
    """The job record (`_SUCCESS`): what ran, with what, and every committed shard.

    `retried`: failed images this run generated again (`run --retry-failed`), of which
    `retried_ok` are now ok. `planned_images`: `read.InputPlan.planned_images`. `kept`:
    committed images of rows no longer in the input (`output.accumulate`), counted in
    `images_committed` and apart as `images_kept`."""
    planned = planned_images
    total = sum(shard["rows"] for shard in shards.values())
    failed = sum(shard["errors"] for shard in shards.values())
    return {
        "status": "succeeded",
        "started_at": started_at,
        "finished_at": finished_at,
        "wall_time_s": round(wall_time_s, 3),
        "images_per_s": round(written_this_run / wall_time_s, 4) if wall_time_s > 0 else 0.0,
        "resumed": resumed,
        "counts": {
            "input_files": input_files,
            "input_rows": input_rows,
            "images_planned": planned,
            "images_committed": total,
            "images_ok": total - failed,
            "images_failed": failed,
            "images_written_this_run": written_this_run,
            "images_retried": retried,
            "images_retried_ok": retried_ok,
            "images_kept": kept,
            "shards": len(shards),
        },
        "stats": job_totals(shards.values()),
        "timeline": timeline or {},
        "generators": generators or {},
        "fingerprint": spec.fingerprint(),
        "spec": spec.snapshot(),
        "versions": package_versions(),
        "shards": [
            {
                name: as_failures(value) if name == "failures" else value
                for name, value in shard.items()
                if name not in RUN_FIELDS
            }
            for shard in sorted(shards.values(), key=lambda shard: shard["first_ordinal"])
        ],
    }


def write_success(storage: Storage, record: dict[str, Any]) -> None:
    """Write the job record as `_SUCCESS`: the job's last write."""
    storage.write_bytes(SUCCESS_FILE, json.dumps(record, indent=2, sort_keys=False).encode())
