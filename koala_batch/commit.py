"""The commit protocol around the write stage: claim the output, resume, record success.

- `claim_output` writes `_job.json` (the fingerprint of what decides the images) before
  anything else, and refuses an output prefix that holds another job or foreign files.
- `load_committed` reads the committed manifests: their keys are skipped on resume.
- `remove_leftovers` deletes tars without a manifest (a write cut short).
- `write_success` writes `_SUCCESS`, the job record, as the job's last write.
"""

from __future__ import annotations

import io
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from koala_batch.config import JobSpec
from koala_batch.keys import KeySet, key_digest
from koala_batch.storage import Storage, with_retries
from koala_batch.write import (
    JOB_FILE,
    MANIFESTS_DIR,
    SHARDS_DIR,
    SUCCESS_FILE,
    manifest_path,
    summary_from_manifest,
    tar_path,
)

JOB_FILE_FORMAT = 1


class OutputConflictError(RuntimeError):
    """The output prefix holds something this job must not touch or resume."""


@dataclass
class CommittedState:
    """What earlier runs committed to an output: per-shard stats and every key."""

    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    keys: KeySet = field(default_factory=KeySet)

    @property
    def images(self) -> int:
        return sum(shard["rows"] for shard in self.shards.values())


def _tree(storage: Storage) -> list[str]:
    """Every file under the output prefix, relative to it."""
    root = storage.path("")

    def find() -> list[str]:
        try:
            return storage.fs.find(root)
        except FileNotFoundError:
            return []

    found = with_retries(find, f"list {storage.url('')}")
    return sorted(posixpath.relpath(path, root) for path in found)


def _is_root_partial(relative: str) -> bool:
    """A half-written `_job.json` or `_SUCCESS` (local filesystems write aside, then rename)."""
    return relative.startswith((f"{JOB_FILE}.", f"{SUCCESS_FILE}.")) and relative.endswith(".partial")


def _is_own_file(relative: str) -> bool:
    if relative in (JOB_FILE, SUCCESS_FILE) or _is_root_partial(relative):
        return True
    directory, _, name = relative.partition("/")
    if "/" in name:
        return False
    if directory == SHARDS_DIR:
        return name.endswith((".tar", ".partial"))
    if directory == MANIFESTS_DIR:
        return name.endswith((".parquet", ".partial"))
    return False


def job_file_contents(spec: JobSpec, run_id: str | None = None) -> dict[str, Any]:
    from koala_batch import __version__

    return {
        "format": JOB_FILE_FORMAT,
        "koala_batch_version": __version__,
        "fingerprint": spec.fingerprint(),
        "determined_by": spec.fingerprint_fields(),
        # The run that owns the output now: writers of an earlier run, still alive after
        # their driver was killed, see another id and stop before committing.
        "run_id": run_id,
    }


def check_output(storage: Storage, spec: JobSpec, overwrite: bool = False) -> tuple[str, list[str]]:
    """Read-only: what a run would do with the output prefix, and the files there now.

    Returns ("new" | "resume" | "overwrite", files). Refuses (OutputConflictError) a prefix
    holding files koala-batch did not write, or the output of a job whose images would
    differ (another fingerprint) unless `overwrite` is set.
    """
    try:
        files = _tree(storage)
    except PermissionError as exc:
        raise OutputConflictError(f"output {storage.url('')}: access denied ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - unreachable endpoint, bad config, ...
        raise OutputConflictError(
            f"output {storage.url('')}: cannot list it ({type(exc).__name__}: {exc})") from None
    foreign = [f for f in files if not _is_own_file(f)]
    if foreign:
        listed = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise OutputConflictError(
            f"output {storage.url('')} holds files koala-batch did not write ({listed}); "
            "choose an empty or new output prefix. Nothing was written."
        )
    if overwrite:
        return ("overwrite" if files else "new"), files
    if JOB_FILE not in files:
        if files:
            raise OutputConflictError(
                f"output {storage.url('')} holds koala-batch files but no {JOB_FILE}; choose a "
                "new output prefix or pass --overwrite"
            )
        return "new", files
    try:
        existing = json.loads(storage.read_bytes(JOB_FILE))
    except (ValueError, OSError) as exc:
        raise OutputConflictError(
            f"output {storage.url(JOB_FILE)} is unreadable ({exc}); choose a new output "
            "prefix or pass --overwrite"
        ) from None
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
    return "resume", files


def claim_output(
    storage: Storage, spec: JobSpec, overwrite: bool = False, run_id: str | None = None
) -> bool:
    """Make the output prefix this job's; True when an earlier run of the same job is resumed.

    Checks it first (`check_output`); `overwrite` deletes koala-batch's own files, never
    others. Then writes `_job.json` and removes a stale `_SUCCESS`.
    """
    state, files = check_output(storage, spec, overwrite)
    if state == "overwrite":
        for relative in files:
            storage.remove(relative)
    storage.write_bytes(JOB_FILE, json.dumps(job_file_contents(spec, run_id), indent=2).encode())
    storage.remove(SUCCESS_FILE)
    return state == "resume"


def load_committed(storage: Storage) -> CommittedState:
    """Committed shards (those with a manifest) and their keys; fails on any duplicate key."""
    names = [name[: -len(".parquet")] for name in storage.list_files(MANIFESTS_DIR, ".parquet")]

    def read(shard: str):
        data = storage.read_bytes(manifest_path(shard))
        return shard, pq.read_table(io.BytesIO(data), columns=["key", "status", "bytes", "ordinal"])

    shards: dict[str, dict[str, Any]] = {}
    digests: list[np.ndarray] = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for shard, manifest in pool.map(read, names):
            keys = manifest.column("key").to_pylist()
            digests.append(np.array([key_digest(key) for key in keys], dtype="S16"))
            shards[shard] = summary_from_manifest(storage, shard, manifest)
    everything = np.concatenate(digests) if digests else np.empty(0, "S16")
    keys = KeySet(everything)
    if len(keys) != len(everything):
        raise OutputConflictError(
            f"committed manifests under {storage.url(MANIFESTS_DIR)} repeat keys "
            f"({', '.join(_shards_sharing_keys(list(shards), digests))} share some); "
            "run `koala-batch verify` on the output"
        )
    return CommittedState(shards=shards, keys=keys)


def _shards_sharing_keys(names: list[str], digests: list[np.ndarray]) -> list[str]:
    owners: dict[bytes, str] = {}
    sharing: list[str] = []
    for name, shard_digests in zip(names, digests):
        for digest in shard_digests.tolist():
            if digest in owners and owners[digest] != name:
                sharing.extend(n for n in (owners[digest], name) if n not in sharing)
            owners.setdefault(digest, name)
    return sharing[:4]


def retire_late_duplicates(storage: Storage, known: set[str]) -> list[str]:
    """Uncommit shards that appeared during this run from outside it and duplicate its rows.

    A writer of a killed run can outlive its driver by a moment and commit a shard after
    this run read the committed state; this run then generated those rows again. Such a
    late shard is retired (manifest first, then tar) when every one of its keys is
    committed by another shard. Returns the retired shard names.
    """
    names = {name[: -len(".parquet")] for name in storage.list_files(MANIFESTS_DIR, ".parquet")}
    late = sorted(names - known)
    if not late:
        return []

    def keys_of(shard: str) -> tuple[str, list[str]]:
        data = storage.read_bytes(manifest_path(shard))
        return shard, pq.read_table(io.BytesIO(data), columns=["key"]).column("key").to_pylist()

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
        storage.remove(manifest_path(shard))
        storage.remove(tar_path(shard))
        retired.append(shard)
    return retired


def remove_leftovers(storage: Storage, committed: CommittedState) -> list[str]:
    """Delete tars without a manifest and half-written files; return what was removed."""
    removed = []
    for name in storage.list_files(SHARDS_DIR):
        shard = name[: -len(".tar")] if name.endswith(".tar") else None
        if shard is None or shard not in committed.shards:
            storage.remove(f"{SHARDS_DIR}/{name}")
            removed.append(f"{SHARDS_DIR}/{name}")
    for name in storage.list_files(MANIFESTS_DIR, ".partial"):
        storage.remove(f"{MANIFESTS_DIR}/{name}")
        removed.append(f"{MANIFESTS_DIR}/{name}")
    for name in storage.list_files("", ".partial"):
        if _is_root_partial(name):
            storage.remove(name)
            removed.append(name)
    return removed


def write_success(storage: Storage, record: dict[str, Any]) -> None:
    """Write the job record as `_SUCCESS`: the job's last write."""
    storage.write_bytes(SUCCESS_FILE, json.dumps(record, indent=2, sort_keys=False).encode())


def shard_paths(storage: Storage, shard: str) -> dict[str, str]:
    return {"tar": storage.url(tar_path(shard)), "manifest": storage.url(manifest_path(shard))}
