"""The job: plan the input, claim the output, run the Ray Data graph, record success.

`build_dataset` assembles the whole graph top to bottom:
read -> validate -> generate (GPU actors) -> encode -> write and commit.
This module also owns the Ray session; the commit protocol and the job record live in
`commit.py`.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from koala_batch.commit import (
    CommittedState,
    build_job_record,
    claim_output,
    commit_timeline,
    load_committed,
    remove_leftovers,
    retire_late_duplicates,
    write_success,
)
from koala_batch.config import JobSpec, load_spec, reveal_storage_options, spec_from_dict
from koala_batch.errors import InputError, JobFailedError, UsageError
from koala_batch.generate import CALLS_PER_ACTOR, GenerateImages, busy_summary
from koala_batch.keys import KeySet
from koala_batch.layout import MANIFESTS_DIR, list_output
from koala_batch.read import InputPlan, ReadRowGroups, plan_input
from koala_batch.schemas import SUMMARY_SCHEMA
from koala_batch.storage import Storage
from koala_batch.validate import ExpandImages
from koala_batch.write import WriteShard

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Overrides:
    """What a caller (a test, a benchmark) puts in place of the spec's own parts.

    The filesystems replace those built from the input and output URLs and their storage
    options; they travel to the Ray workers, so they must pickle. `generator_cls`
    replaces the generation stage (same constructor, same table in and out).
    """

    input_filesystem: Any | None = None
    output_filesystem: Any | None = None
    generator_cls: type[GenerateImages] = GenerateImages


QUIET_WORKER_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def root_cause(exc: BaseException) -> BaseException:
    """The original exception inside Ray's wrappers (RayTaskError, UserCodeException)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if inner is None:
            break
        exc = inner
    return exc


def describe_failure(exc: BaseException) -> str:
    """One readable line for a failed task: the root cause and the notes naming its target."""
    cause = root_cause(exc)
    notes = "; ".join(getattr(cause, "__notes__", []))
    text = f"{type(cause).__name__}: {cause}".strip()
    return f"{text} ({notes})" if notes else text


def coerce_spec(spec: JobSpec | dict[str, Any] | str | Path) -> JobSpec:
    """Accept a JobSpec, a raw dict, or a YAML path."""
    if isinstance(spec, JobSpec):
        return spec
    if isinstance(spec, dict):
        return spec_from_dict(spec)
    return load_spec(spec)


def connect_ray(spec: JobSpec) -> bool:
    """Join RAY_ADDRESS / compute.ray_address, or start a local cluster; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    address = spec.compute.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    num_cpus = spec.compute.local_num_cpus or max(4, 2 * (os.cpu_count() or 1))
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=spec.compute.local_object_store_mb * 2**20,
        include_dashboard=False,
    )
    return True


def resolve_gpus_per_actor(spec: JobSpec) -> float:
    """compute.num_gpus_per_actor, with auto = 1 when the cluster has any GPU."""
    import ray

    if spec.compute.num_gpus_per_actor == "auto":
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return float(spec.compute.num_gpus_per_actor)


# CPUs reserved by each task of the light stages: reading, the two rebundlings, writing.
LIGHT_TASK_CPUS = 0.25
# What a node must keep beside its generator actors for one task of each light stage to
# run at once: with less, one of them waits for generation to end, and so do the commits.
LIGHT_STAGES_CPUS = 4 * LIGHT_TASK_CPUS


def rebundle(dataset: Any, rows: int) -> Any:
    """The dataset in blocks of exactly `rows` rows (the last one may be short).

    Ray Data's streaming repartition runs as map tasks that take a whole CPU by default
    and hold it while their output waits downstream. Two such tasks on a node whose
    CPUs the generator actors hold starve the writer until generation ends, and
    nothing is committed before then; so they are made as light as the other light
    stages. Ray 2.60's `repartition` takes no resource arguments: the logical operator
    it adds is given them directly.
    """
    dataset = dataset.repartition(target_num_rows_per_block=rows, strict=True)
    repartition = dataset._logical_plan.dag
    if type(repartition).__name__ != "StreamingRepartition":
        raise RuntimeError(f"expected Ray Data's StreamingRepartition, got {repartition!r}")
    repartition.ray_remote_args["num_cpus"] = LIGHT_TASK_CPUS
    return dataset


def start_stats_collector() -> Any:
    """A small actor the generators report their GeneratorStats to, after every batch."""
    import ray

    @ray.remote(num_cpus=0)
    class GeneratorStatsCollector:
        def __init__(self) -> None:
            self.workers: dict[str, dict[str, Any]] = {}

        def report(self, snapshot: dict[str, Any]) -> None:
            self.workers[snapshot["worker"]] = snapshot

        def collect(self) -> list[dict[str, Any]]:
            return list(self.workers.values())

    return GeneratorStatsCollector.remote()  # type: ignore[attr-defined]


def collect_busy_summary(stats: Any, ended_at: float) -> dict[str, Any]:
    """The generators' busy summary, or an empty one if the collector cannot answer: the
    images are committed either way, and the record must still be written."""
    import ray

    try:
        return busy_summary(ray.get(stats.collect.remote(), timeout=60), ended_at)
    except Exception as exc:  # noqa: BLE001 - statistics never fail a finished job
        logger.warning("generator statistics unavailable: %s", describe_failure(exc))
        return {}


def build_dataset(
    spec: JobSpec,
    plan: InputPlan,
    committed_keys: KeySet | None = None,
    *,
    run_id: str | None = None,
    overrides: Overrides | None = None,
    stats: Any = None,
):
    """The Ray Data graph of a job, top to bottom; its rows are per-shard stats."""
    import ray.data

    overrides = overrides or Overrides()
    compute = spec.compute
    task_args: dict[str, Any] = {}
    actor_args: dict[str, Any] = {}
    if compute.max_task_retries is not None:
        task_args["max_retries"] = compute.max_task_retries
        actor_args["max_task_retries"] = compute.max_task_retries
    if compute.max_actor_restarts is not None:
        actor_args["max_restarts"] = compute.max_actor_restarts
    min_actors, max_actors = compute.actor_range
    sizes = (
        {"size": min_actors}
        if min_actors == max_actors
        else {"min_size": min_actors, "max_size": max_actors}
    )
    # Two calls per actor at once: one holds the pipeline, the other encodes the batch
    # before (the generator serialises pipeline calls itself).
    pool = ray.data.ActorPoolStrategy(
        **sizes,
        max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
        enable_true_multi_threading=True,
    )
    units = plan.read_units()

    # Light stages run as tasks: their instances are built here and shipped to each task.
    dataset = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    dataset = dataset.map_batches(
        ReadRowGroups(spec.input, overrides.input_filesystem),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=LIGHT_TASK_CPUS,
        **task_args,
    )
    dataset = dataset.map_batches(
        ExpandImages(spec, committed_keys),
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=LIGHT_TASK_CPUS,
        **task_args,
    )
    # Blocks of exactly one pipeline call, so every actor gets work (a whole Parquet
    # file would otherwise feed a single actor).
    dataset = rebundle(dataset, compute.batch_size)
    dataset = dataset.map_batches(
        overrides.generator_cls,
        fn_constructor_kwargs={
            "spec": spec,
            "torch_threads": compute.torch_threads or max(1, int(compute.num_cpus_per_actor)),
            "stats": stats,
        },
        batch_size=compute.batch_size,
        batch_format="pyarrow",
        compute=pool,
        num_gpus=resolve_gpus_per_actor(spec),
        num_cpus=compute.num_cpus_per_actor,
        # Set before the actor imports diffusers: its import-time warnings are noise here.
        runtime_env={"env_vars": QUIET_WORKER_ENV},
        **actor_args,
    )
    # Blocks of exactly rows_per_shard images: one block, one shard.
    dataset = rebundle(dataset, spec.output.rows_per_shard)
    dataset = dataset.map_batches(
        WriteShard(spec, overrides.output_filesystem, run_id),
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=LIGHT_TASK_CPUS,
        **task_args,
    )
    return dataset


def _configure_ray_data() -> None:
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = os.environ.get("KOALA_BATCH_PROGRESS", "0") == "1"
    context.execution_options.preserve_order = False
    # Surface a stage's own exception (with its notes naming the file) rather than
    # Ray's generic UserCodeException, which keeps only its text.
    context.raise_original_map_exception = True


def generate_remaining(
    spec: JobSpec,
    plan: InputPlan,
    committed: CommittedState,
    run_id: str | None = None,
    overrides: Overrides | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the Ray Data graph over what is not committed: the stats of the shards it wrote
    and the generators' busy summary."""
    started_ray = connect_ray(spec)
    written: list[dict[str, Any]] = []
    try:
        _configure_ray_data()
        stats = start_stats_collector()
        dataset = build_dataset(
            spec, plan, committed.keys, run_id=run_id, overrides=overrides, stats=stats
        )
        remaining = plan.num_rows * spec.generation.images_per_prompt - len(committed.keys)
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for shard in batch.cast(SUMMARY_SCHEMA).to_pylist():
                written.append(shard)
                logger.info(
                    "committed shard %s: %d images (%d errors); %d of %d this run",
                    shard["shard"],
                    shard["rows"],
                    shard["errors"],
                    sum(s["rows"] for s in written),
                    remaining,
                )
        generators = collect_busy_summary(stats, ended_at=time.time())
    except (UsageError, JobFailedError):
        raise
    except Exception as exc:
        cause = root_cause(exc)
        if isinstance(cause, InputError):
            raise cause from None
        raise JobFailedError(
            f"{describe_failure(exc)}; {sum(s['rows'] for s in written)} images were committed "
            "this run and are kept: rerun the same spec to resume"
        ) from exc
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    return written, generators


def run(
    spec: JobSpec | dict[str, Any] | str | Path,
    overrides: Overrides | None = None,
) -> dict[str, Any]:
    """Run a job to completion and return its record (also written as OUTPUT/_SUCCESS).

    Resumes an earlier run of the same spec on the same output: only images not yet
    committed are generated. `overrides` replaces the filesystems or the generator
    (tests, benchmarks).
    """
    spec = coerce_spec(spec)
    overrides = overrides or Overrides()
    started = time.time()
    started_at = datetime.now(UTC).isoformat()

    # Input problems fail here, before Ray starts or any model loads.
    plan = plan_input(spec.input, overrides.input_filesystem)
    planned_images = plan.num_rows * spec.generation.images_per_prompt
    logger.info(
        "input: %d files, %d rows, %d images planned",
        len(plan.files),
        plan.num_rows,
        planned_images,
    )

    storage = Storage(
        spec.output.uri,
        reveal_storage_options(spec.output.storage_options),
        overrides.output_filesystem,
    )
    run_id = uuid.uuid4().hex
    resumed = claim_output(storage, spec, overwrite=spec.output.overwrite, run_id=run_id)
    committed = CommittedState()
    if resumed:
        # One listing serves both: a large output on object storage lists slowly.
        listing = list_output(storage)
        committed = load_committed(storage, listing)
        removed = remove_leftovers(storage, listing)
        logger.info(
            "resuming: %d images in %d shards already committed; %d leftovers removed",
            committed.images,
            len(committed.shards),
            len(removed),
        )

    written: list[dict[str, Any]] = []
    generators: dict[str, Any] = {}
    if planned_images > len(committed.keys):
        written, generators = generate_remaining(spec, plan, committed, run_id, overrides)
    shards = {**committed.shards, **{shard["shard"]: shard for shard in written}}
    retired = retire_late_duplicates(storage, set(shards))
    if retired:
        logger.warning(
            "retired %d shard(s) committed late by a killed earlier run and "
            "regenerated by this one: %s",
            len(retired),
            ", ".join(retired),
        )

    record = build_job_record(
        spec,
        started_at=started_at,
        finished_at=datetime.now(UTC).isoformat(),
        wall_time_s=time.time() - started,
        resumed=resumed,
        input_files=len(plan.files),
        input_rows=plan.num_rows,
        shards=shards,
        written_this_run=sum(shard["rows"] for shard in written),
        timeline=commit_timeline(started, written),
        generators=generators,
    )
    counts = record["counts"]
    if counts["images_committed"] != planned_images:
        raise JobFailedError(
            f"{counts['images_committed']} images are committed but {planned_images} were "
            "planned; rerun the job to resume, then run `koala-batch verify`"
        )
    failed = counts["images_failed"]
    if planned_images and failed / planned_images > spec.output.max_failed_fraction:
        raise JobFailedError(
            f"{failed} of {planned_images} images failed ({failed / planned_images:.1%}), more "
            f"than output.max_failed_fraction={spec.output.max_failed_fraction}; see the "
            f"manifests' error column under {storage.url(MANIFESTS_DIR)}"
        )
    write_success(storage, record)
    return record
