"""What an output holds against what the input plans, by key and by what each key was
made from: the refusals before a run touches the output, and the check before `_SUCCESS`.

Every decision here compares key sets (`keys.KeySet`), never counts: an input whose rows
changed can plan as many images as the output holds and still be another job.

- A committed key the input does not plan is stale: refused unless `output.accumulate`
  keeps such images (then a damaged shard holding them, which no run can make again, is
  refused instead of uncommitted).
- A committed ok image whose row changed under the same id (prompt, negative prompt,
  seed or a per-row parameter: `keys.made_from_digest`) is refused in both modes. A
  failed row may change: `run --retry-failed` generates it again from the new row.
- A run succeeds only when every planned key is committed exactly once, from what the
  input says now.
"""

from __future__ import annotations

from typing import Any

from koala_batch.errors import JobFailedError, OutputConflictError
from koala_batch.inputs.files import InputPlan
from koala_batch.inputs.rows import find_planned
from koala_batch.keys import KeySet
from koala_batch.output.commit import CommittedState, damage_beyond_input
from koala_batch.output.layout import manifest_path
from koala_batch.spec import JobSpec
from koala_batch.storage import Storage

# What every refusal of an output that does not match the input offers.
_WAYS_OUT = (
    "write to a new output prefix, or pass --overwrite (output.overwrite: true) to "
    "regenerate it for this input"
)


def stale_keys(committed: CommittedState, planned: KeySet) -> KeySet:
    """Committed keys that the input does not plan (rows removed or ids changed)."""
    return committed.keys.difference(planned)


def changed_images(committed: CommittedState, planned: KeySet) -> KeySet:
    """Planned keys committed as ok images made from another version of their row."""
    return committed.keys.changed(planned).difference(KeySet.from_keys(committed.failed))


def changed_failures(committed: CommittedState, planned: KeySet) -> int:
    """Failed keys whose row changed since they failed (a retry makes them from the new row)."""
    return committed.keys.changed(planned).overlap(KeySet.from_keys(committed.failed))


def stale_rows_error(storage: Storage, stale: int) -> OutputConflictError:
    """The refusal of an output holding images of rows that this input does not have."""
    return OutputConflictError(
        f"output {storage.url('')} holds {stale} committed image(s) of rows not in this "
        "input (rows removed or ids changed since the output was made); the output is left "
        "as it is. To keep them and add this input's images (one output over a sliding "
        f"window of inputs), set output.accumulate: true; else {_WAYS_OUT}"
    )


def describe_row(row: dict[str, Any] | None) -> str:
    """One planned image, as a message names it."""
    if row is None:
        return "no longer in the input"
    where = f" ({row['source']} row {row['row_index']})" if row.get("source") else ""
    return f"id {row['id']!r} image {row['image_index']}{where}"


def changed_rows_error(storage: Storage, changed: int, example: str) -> OutputConflictError:
    """The refusal of an output whose committed images were made from rows since changed."""
    return OutputConflictError(
        f"output {storage.url('')}: {changed} committed image(s) were generated from input "
        "rows that have changed since under the same id (prompt, negative prompt, seed or a "
        f"generation parameter), e.g. {example}; the output is left as it is. Restore "
        "those rows, or give the changed rows new ids (with output.accumulate: true the old "
        f"images are kept), or {_WAYS_OUT}"
    )


def refuse_damage_beyond_input(
    storage: Storage, committed: CommittedState, planned: KeySet
) -> None:
    """Stop, touching nothing, where damaged shards hold images this input cannot make
    again: uncommitting them would lose those images for good."""
    beyond = damage_beyond_input(committed, planned)
    if not beyond:
        return
    shards = "; ".join(
        f"{storage.url(manifest_path(shard))}: {why}" for shard, why in beyond.items()
    )
    raise OutputConflictError(
        f"output {storage.url('')}: {len(beyond)} committed shard(s) are damaged and hold "
        f"images of rows this input no longer has (output.accumulate), which no run can make "
        f"again: {shards}. Restore the shards' files, or rerun with an input that holds those "
        "rows; to give the images up, delete the shards' manifests"
    )


def check_resume(
    storage: Storage,
    spec: JobSpec,
    plan: InputPlan,
    committed: CommittedState,
    planned: KeySet,
    input_filesystem: Any | None = None,
) -> None:
    """Refuse (OutputConflictError, before anything is written) an output that this input
    cannot resume: stale keys without output.accumulate, damaged shards of rows the input
    no longer has with it, and committed images of changed rows in both modes."""
    if spec.output.accumulate:
        refuse_damage_beyond_input(storage, committed, planned)
    else:
        stale = stale_keys(committed, planned)
        if len(stale):
            raise stale_rows_error(storage, len(stale))
    changed = changed_images(committed, planned)
    if len(changed):
        example = find_planned(spec, plan, changed, input_filesystem)
        raise changed_rows_error(storage, len(changed), describe_row(example))


def check_complete(
    storage: Storage,
    spec: JobSpec,
    plan: InputPlan,
    final: CommittedState,
    planned: KeySet,
    input_filesystem: Any | None = None,
) -> None:
    """Raise unless the output holds every planned key once, each ok image made from what
    its row says now, and (without output.accumulate) no other key: what `_SUCCESS`
    promises."""
    missing = planned.difference(final.keys)
    if len(missing):
        example = describe_row(find_planned(spec, plan, missing, input_filesystem))
        raise JobFailedError(
            f"{len(missing)} planned image(s) are not committed under {storage.url('')}, "
            f"e.g. {example}; rerun the same command to resume, then run `koala-batch verify`"
        )
    if not spec.output.accumulate:
        stale = stale_keys(final, planned)
        if len(stale):
            raise stale_rows_error(storage, len(stale))
    changed = changed_images(final, planned)
    if len(changed):
        example = describe_row(find_planned(spec, plan, changed, input_filesystem))
        raise JobFailedError(
            f"the input changed while the job ran: {len(changed)} committed image(s) were "
            f"made from another version of their row, e.g. {example}; rerun the same "
            "command, which says how to go on"
        )
