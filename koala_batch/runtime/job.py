"""A job's run, step by step: plan the input, check and claim the output, run the graph
(`runtime.graph`) over what remains, and record success (`output.commit`)."""

from __future__ import annotations

import io
import logging
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pyarrow.parquet as pq

from koala_batch.errors import (
    ClusterResourcesError,
    InputError,
    Interrupted,
    JobFailedError,
    RunSupersededError,
    UsageError,
)
from koala_batch.inputs.files import InputPlan, plan_input
from koala_batch.inputs.rows import planned_keys
from koala_batch.keys import KeySet
from koala_batch.models.preflight import check_model
from koala_batch.output.card import write_card
from koala_batch.output.commit import (
    CommittedState,
    build_job_record,
    check_output,
    claim_output,
    commit_timeline,
    load_committed,
    release_failed,
    remove_leftovers,
    retire_late_duplicates,
    retire_superseded_rows,
    retriable_failures,
    uncommit,
    write_success,
)
from koala_batch.output.coverage import (
    changed_failures,
    check_complete,
    check_resume,
    stale_keys,
)
from koala_batch.output.layout import (
    CARD_FILE,
    JOB_FILE,
    MANIFESTS_DIR,
    SUCCESS_FILE,
    FileKind,
    OutputListing,
    classify,
    list_output,
    manifest_path,
)
from koala_batch.output.lease import OutputLease
from koala_batch.output.stats import run_cost
from koala_batch.runtime.collector import collect_busy_summary, poll_progress, start_stats_collector
from koala_batch.runtime.console import (
    JobProgress,
    quiet_ray_console,
)
from koala_batch.runtime.failures import describe_failure, root_cause, stage_error
from koala_batch.runtime.graph import Substitutes, build_dataset, job_data_context
from koala_batch.runtime.session import (
    cluster_view,
    connect_ray,
    placement_problem,
    ray_address,
    resolve_gpus_per_actor,
    shutdown_ray_within,
    wait_for_placement,
)
from koala_batch.runtime.signals import (
    STOP_RAY_SHUTDOWN_S,
    SignalStop,
    current_stop,
    kept_signal_handlers,
)
from koala_batch.schemas import (
    SUMMARY_SCHEMA,
    Col,
)
from koala_batch.spec import (
    JobSpec,
    load_spec,
    reveal_storage_options,
    spec_from_dict,
)
from koala_batch.storage import Storage

logger = logging.getLogger(__name__)


def coerce_spec(spec: JobSpec | dict[str, Any] | str | Path) -> JobSpec:
    """Accept a JobSpec, a raw dict, or a YAML path."""
    if isinstance(spec, JobSpec):
        return spec
    if isinstance(spec, dict):
        return spec_from_dict(spec)
    return load_spec(spec)


def generate_remaining(
    spec: JobSpec,
    plan: InputPlan,
    committed: CommittedState,
    planned: KeySet,
    run_id: str | None = None,
    substitutes: Substitutes | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the Ray Data graph over the planned keys that are not committed: the stats of
    the shards it wrote and the generators' busy summary (with the GPUs each actor
    reserved).

    A KeyboardInterrupt (Ctrl-C; SIGINT or SIGTERM where the CLI's `stop_on_signals` is
    in place) stops it: the local cluster is shut down and `Interrupted` says how many of
    the planned images are committed (every committed shard is kept for the rerun). No
    signal handler of the caller's is changed.
    """
    stop = current_stop()
    graph = GraphRun(spec, plan, committed, planned, run_id, substitutes, stop)
    written = graph.written
    try:
        generators = graph.run()
    except KeyboardInterrupt:
        signum = stop.received or signal.SIGINT
        with stop.held():
            now = committed_keys_now(spec, substitutes, committed, written)
        at_least = ""
        if now is None:
            at_least, now = "at least ", committed.keys.union(keys_written(written))
        done = now.overlap(planned)
        before = committed.keys.overlap(planned)
        raise Interrupted(
            signum,
            f"stopped by {signal.Signals(signum).name}: {at_least}{done} of {len(planned)} "
            f"images are committed ({at_least}{done - before} this run); "
            "rerun the same command to resume",
        ) from None
    return written, generators


def keys_written(written: list[dict[str, Any]]) -> KeySet:
    """The keys of the shards this run committed (their summaries carry their digests)."""
    return KeySet(np.concatenate([shard["keys"] for shard in written]) if written else None)


def committed_keys_now(
    spec: JobSpec,
    substitutes: Substitutes | None,
    committed: CommittedState,
    written: list[dict[str, Any]],
) -> KeySet | None:
    """The keys committed under the output now: those the run started with, those of the
    shards it saw committed, and those of shards committed since (writers may commit after
    the driver stopped listening), read from their manifests. None if the output cannot
    be read."""
    substitutes = substitutes or Substitutes()
    known = set(committed.shards) | {shard["shard"] for shard in written}
    try:
        storage = Storage(
            spec.output.uri,
            reveal_storage_options(spec.output.storage_options),
            substitutes.output_filesystem,
        )
        late: list[str] = []
        for name in storage.list_files(MANIFESTS_DIR):
            kind, shard = classify(f"{MANIFESTS_DIR}/{name}")
            if kind is not FileKind.MANIFEST or shard is None or shard in known:
                continue
            data = io.BytesIO(storage.read_bytes(manifest_path(shard)))
            late.extend(pq.read_table(data, columns=[Col.KEY]).column(Col.KEY).to_pylist())
    except Exception as exc:  # noqa: BLE001 - the count only words the message
        logger.debug("cannot read the committed keys: %s", describe_failure(exc))
        return None
    return committed.keys.union(keys_written(written)).union(KeySet.from_keys(late))


@dataclass
class GraphRun:
    """`generate_remaining`'s work, step by step: a Ray session, placement, the graph, and
    each shard as it commits (`written` receives its summary)."""

    spec: JobSpec
    plan: InputPlan
    committed: CommittedState
    planned: KeySet
    run_id: str | None
    substitutes: Substitutes | None
    stop: SignalStop
    written: list[dict[str, Any]] = field(default_factory=list)
    # Images this run has to make: planned and not committed when it started.
    remaining: int = 0

    def run(self) -> dict[str, Any]:
        """Generate and commit what remains; the generators' busy summary."""
        with self.ray_session() as started_ray:
            try:
                return self.generate(started_ray)
            except Exception as exc:  # noqa: BLE001 - every failure ends in one line
                self.raise_failure(exc)

    @contextmanager
    def ray_session(self) -> Iterator[bool]:
        """Connected to Ray (True: by this run, which leaves it at the end, in time if
        stopping), with the CLI's console quieting and a job's DataContext settings."""
        with ExitStack() as scope:
            scope.enter_context(quiet_ray_console())
            with kept_signal_handlers():  # ray.init puts in a SIGTERM handler of its own
                started_ray = connect_ray(self.spec)
            if started_ray:
                scope.callback(self.leave_ray)
            scope.enter_context(job_data_context())
            yield started_ray

    def leave_ray(self) -> None:
        import ray

        with self.stop.held():
            if self.stop.received is None:
                ray.shutdown()
            else:  # stopping: bounded, the stop has a deadline
                shutdown_ray_within(self.stop.seconds_left(STOP_RAY_SHUTDOWN_S))

    def place(self, started_ray: bool) -> float:
        """The GPUs per actor, once the cluster can hold the actors (or may yet)."""
        spec = self.spec
        gpus = resolve_gpus_per_actor(spec)
        view = cluster_view(local=started_ray and ray_address(spec) is None)
        compute = spec.compute
        problem = placement_problem(view, compute.actor_range[0], compute.num_cpus_per_actor, gpus)
        if problem:
            raise ClusterResourcesError(problem)
        wait_for_placement(spec, gpus)
        return gpus

    def generate(self, started_ray: bool) -> dict[str, Any]:
        gpus = self.place(started_ray)
        self.remaining = len(self.planned.difference(self.committed.keys))
        collector = start_stats_collector()
        dataset = build_dataset(
            self.spec,
            self.plan,
            self.committed.keys,
            run_id=self.run_id,
            substitutes=self.substitutes,
            collector=collector,
        )
        progress = JobProgress(logger, len(self.planned), self.committed.keys.overlap(self.planned))
        poller = poll_progress(progress, collector)
        try:
            for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                for shard in batch.cast(SUMMARY_SCHEMA).to_pylist():
                    self.committed_shard(shard, progress)
        finally:
            poller.stop(timeout_s=10.0 if self.stop.received is None else 2.0)
        progress.report(final=True)
        generators = collect_busy_summary(collector, ended_at=time.time())
        # What the actors reserved: the run's GPU-hours (the record's `cost`) count it.
        generators["gpus_per_actor"] = gpus
        return generators

    def committed_shard(self, shard: dict[str, Any], progress: JobProgress) -> None:
        """Keep a committed shard's summary and say so."""
        # Kept for the run's end as 16-byte digests, not strings: the driver holds every
        # shard's summary until then.
        shard["keys"] = KeySet.from_keys(shard["keys"] or ()).digests
        self.written.append(shard)
        progress.add_commit(shard["rows"], shard["errors"])
        logger.info(
            "committed shard %s: %d images (%d errors); %d of %d this run",
            shard["shard"],
            shard["rows"],
            shard["errors"],
            sum(s["rows"] for s in self.written),
            self.remaining,
            extra={
                "event": "shard_committed",
                "shard": shard["shard"],
                "images": shard["rows"],
                "errors": shard["errors"],
                "done": progress.snapshot().done,
                "total": len(self.planned),
            },
        )
        progress.report()

    def raise_failure(self, exc: Exception) -> NoReturn:
        """Raise what a failed run ends with: a stage's own error as it raised it, else one
        line with what was committed."""
        if isinstance(exc, (UsageError, JobFailedError)):
            # Ray raises a stage's error as a subclass of its type whose message is the
            # whole remote traceback; `cause` holds the original, one line.
            original = getattr(exc, "cause", None)
            if isinstance(original, (UsageError, JobFailedError)):
                raise stage_error(original) from None
            raise exc
        cause = root_cause(exc)
        if isinstance(cause, InputError):
            raise stage_error(cause) from None
        if isinstance(cause, RunSupersededError):
            # Ray Data's notes on a failed task (retry advice) would mislead here.
            raise JobFailedError(
                f"{cause}: another run took it over (two runs on one output at once), so this "
                "one stopped without committing more; the other carries on"
            ) from None
        committed = sum(s["rows"] for s in self.written)
        raise JobFailedError(
            f"{describe_failure(exc)}; {committed} images were committed this run and are "
            "kept: rerun the same spec to resume"
        ) from exc


def settle_retries(
    storage: Storage, committed: CommittedState, run_id: str | None
) -> CommittedState:
    """Retire the rows that newer rows of the same keys supersede (a retry of failed
    images, cut short or just done) and return the committed state after it."""
    if not committed.superseded:
        return committed
    retired = retire_superseded_rows(storage, committed.superseded, run_id)
    logger.info(
        "retired %d failed row(s) that a retry replaced: %d manifest(s) rewritten, %d "
        "shard(s) left empty and uncommitted",
        retired.rows,
        len(retired.rewritten),
        len(retired.uncommitted),
    )
    return load_committed(storage)


def run(
    spec: JobSpec | dict[str, Any] | str | Path,
    substitutes: Substitutes | None = None,
    *,
    retry_failed: bool = False,
) -> dict[str, Any]:
    """Run a job to completion and return its record (also written as OUTPUT/_SUCCESS).

    Resumes an earlier run of the same spec on the same output: only planned images whose
    keys are not committed are generated. An output holding images this input does not
    plan, or images of rows changed since under the same id, is refused before anything
    is written (`coverage.check_resume`); with `output.accumulate`, the images of rows no
    longer in the input are kept instead (the record's `images_kept`). `retry_failed` also
    generates again the images committed as error rows, and replaces those rows with the
    new ones. `substitutes` replaces the filesystems or the generator (tests, benchmarks).
    Another live run on the same output: `OutputBusyError`, nothing written.
    """
    spec = coerce_spec(spec)
    substitutes = substitutes or Substitutes()
    started = time.time()
    started_at = datetime.now(UTC).isoformat()

    # Input, model and output problems fail here, before Ray starts or any model loads.
    plan = plan_input(
        spec.input,
        substitutes.input_filesystem,
        spec.output.uri,
        images_per_prompt=spec.generation.images_per_prompt,
    )
    logger.info(
        "input: %d files, %d rows, %d images planned",
        len(plan.files),
        plan.num_rows,
        plan.planned_images,
    )
    logger.info("model: %s, from %s", spec.model.name, check_model(spec.model))

    storage = Storage(
        spec.output.uri,
        reveal_storage_options(spec.output.storage_options),
        substitutes.output_filesystem,
    )
    # Read-only, so that an output this job must not touch is refused before the lease
    # writes anything there; both checks run again under the lease. A missing bucket or a
    # file in the way fails here too, naming the output, rather than at the lease.
    state = check_output(storage, spec, spec.output.overwrite)
    planned = planned_keys(spec, plan, substitutes.input_filesystem)
    checked: tuple[OutputListing, CommittedState] | None = None
    if state.action == "resume":
        checked = state.listing, load_committed(storage, state.listing)
        check_resume(storage, spec, plan, checked[1], planned, substitutes.input_filesystem)
    storage.check_writable(JOB_FILE)
    run_id = uuid.uuid4().hex
    output = OutputRun(spec, plan, planned, storage, run_id, substitutes, checked)
    with OutputLease(storage, run_id, spec.output.heartbeat_s):
        return output.run(retry_failed, started, started_at)


@dataclass
class Resumed:
    """Where a run on an output starts: what is committed (without the keys it retries),
    the failed keys it retries (key -> shard), and whether an earlier run's output is
    resumed at all."""

    committed: CommittedState
    retrying: dict[str, str]
    resumed: bool


@dataclass
class OutputRun:
    """`run` once the input is planned and the output checked: its steps on the output,
    taken under the output's lease (`run`)."""

    spec: JobSpec
    plan: InputPlan
    planned: KeySet
    storage: Storage
    run_id: str
    substitutes: Substitutes
    # The listing and committed state read (and checked) before the lease, if any.
    checked: tuple[OutputListing, CommittedState] | None = None

    def run(self, retry_failed: bool, started: float, started_at: str) -> dict[str, Any]:
        """Claim, resume, generate what is missing, check, record."""
        start = self.resume(retry_failed)
        written: list[dict[str, Any]] = []
        generators: dict[str, Any] = {}
        if len(self.planned.difference(start.committed.keys)):
            written, generators = generate_remaining(
                self.spec, self.plan, start.committed, self.planned, self.run_id, self.substitutes
            )
        final = self.settle(start.committed, written)
        check_complete(
            self.storage,
            self.spec,
            self.plan,
            final,
            self.planned,
            self.substitutes.input_filesystem,
        )
        retried_ok = self.report_retries(start.retrying, final)
        record = build_job_record(
            self.spec,
            started_at=started_at,
            finished_at=datetime.now(UTC).isoformat(),
            wall_time_s=time.time() - started,
            resumed=start.resumed,
            input_files=len(self.plan.files),
            input_rows=self.plan.num_rows,
            planned_images=len(self.planned),
            shards=final.shards,
            written_this_run=sum(shard["rows"] for shard in written),
            timeline=commit_timeline(started, written),
            generators=generators,
            retried=len(start.retrying),
            retried_ok=retried_ok,
            kept=len(stale_keys(final, self.planned)),
        )
        cost = run_cost(
            # A run with nothing left to generate started no actors: no GPU-hours.
            generators.get("per_actor") if generators else [],
            generators.get("gpus_per_actor"),
            images=sum(shard["ok"] for shard in written),
            gpu_hour_cost=self.spec.compute.gpu_hour_cost,
        )
        # Before the long shard list, where a reader of `_SUCCESS` finds the run's figures.
        shard_list = record.pop("shards")
        record.update(cost=cost, shards=shard_list)
        self.check_failures(record["counts"])
        write_card(self.storage, record, self.spec)
        write_success(self.storage, record)
        return record

    def resume(self, retry_failed: bool) -> Resumed:
        """Claim the output; on an earlier run's output, check it against the input again
        (under the lease now), finish a retry cut short, take damaged shards and leftovers
        out, and release the failed keys a retry generates again."""
        storage, spec, planned = self.storage, self.spec, self.planned
        resumed = claim_output(storage, spec, overwrite=spec.output.overwrite, run_id=self.run_id)
        if not resumed:
            return Resumed(CommittedState(), {}, False)
        # One listing serves both: a large output on object storage lists slowly.
        listing = list_output(storage)
        committed = self.committed_under_lease(listing)
        if (
            len(planned.difference(committed.keys))
            or committed.superseded
            or (retry_failed and committed.failed)
        ):
            # The output is about to change: it is no longer what `_SUCCESS` and the
            # card describe (both are written again when the run succeeds).
            storage.remove(SUCCESS_FILE)
            storage.remove(CARD_FILE)
        # A retry cut short is finished before anything else.
        committed = settle_retries(storage, committed, self.run_id)
        self.uncommit_damaged(committed)
        removed = remove_leftovers(storage, listing)
        logger.info(
            "resuming: %d of the %d planned images already committed in %d shards; %d "
            "leftovers removed",
            committed.keys.overlap(planned),
            len(planned),
            len(committed.shards),
            len(removed),
        )
        if spec.output.accumulate:
            logger.info(
                "accumulating: %d committed images of rows no longer in the input are kept",
                len(stale_keys(committed, planned)),
            )
        if not retry_failed:
            changed = changed_failures(committed, planned)
            if changed:
                logger.info(
                    "%d failed image(s) have changed input rows since they failed; "
                    "`run --retry-failed` generates them again from the new rows",
                    changed,
                )
            return Resumed(committed, {}, True)
        retrying = retriable_failures(committed, planned)
        logger.info("retrying %d failed image(s) recorded as error rows", len(retrying))
        return Resumed(release_failed(committed, retrying), retrying, True)

    def committed_under_lease(self, listing: OutputListing) -> CommittedState:
        """The committed state, checked against the input: the one read before the lease
        when no shard file changed since (names and sizes), else read and checked again
        (another run committed in between)."""
        if self.checked is not None:
            before, committed = self.checked
            sizes = listing.shard_file_sizes()
            if None not in sizes.values() and sizes == before.shard_file_sizes():
                return committed
        committed = load_committed(self.storage, listing)
        check_resume(
            self.storage, self.spec, self.plan, committed, self.planned,
            self.substitutes.input_filesystem,
        )  # fmt: skip
        return committed

    def uncommit_damaged(self, committed: CommittedState) -> None:
        """Take the damaged shards out: their rows are generated again."""
        if not committed.damaged:
            return
        uncommit(self.storage, sorted(committed.damaged))
        logger.warning(
            "%d committed shard(s) were damaged and are generated again: %s",
            len(committed.damaged),
            "; ".join(
                f"{self.storage.url(manifest_path(shard))}: {why}"
                for shard, why in sorted(committed.damaged.items())
            ),
        )

    def settle(self, committed: CommittedState, written: list[dict[str, Any]]) -> CommittedState:
        """The output after the graph: late duplicates of a killed earlier run retired,
        every error row that a retry replaced taken out, read back from the manifests."""
        shards = set(committed.shards) | {shard["shard"] for shard in written}
        retired = retire_late_duplicates(self.storage, shards)
        if retired:
            logger.warning(
                "retired %d shard(s) committed late by a killed earlier run and "
                "regenerated by this one: %s",
                len(retired),
                ", ".join(retired),
            )
        return settle_retries(self.storage, load_committed(self.storage), self.run_id)

    def report_retries(self, retrying: dict[str, str], final: CommittedState) -> int:
        """Log how the retried keys came out; how many are ok now."""
        if not retrying:
            return 0
        again = [key for key in retrying if key in final.failed]
        ok = int(final.keys.contains_many(list(retrying)).sum()) - len(again)
        logger.info(
            "retried %d failed image(s): %d now ok, %d failed again", len(retrying), ok, len(again)
        )
        return ok

    def check_failures(self, counts: dict[str, Any]) -> None:
        """Fail a run whose failed images exceed output.max_failed_fraction."""
        failed, total = counts["images_failed"], counts["images_committed"]
        if total and failed / total > self.spec.output.max_failed_fraction:
            raise JobFailedError(
                f"{failed} of {total} images failed ({failed / total:.1%}), more "
                f"than output.max_failed_fraction={self.spec.output.max_failed_fraction}; see "
                f"the manifests' error column under {self.storage.url(MANIFESTS_DIR)}"
            )
