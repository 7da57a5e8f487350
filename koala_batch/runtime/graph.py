"""The Ray Data graph: `build_dataset` assembles a job's, top to bottom, around
`generate_images`, its public middle."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from koala_batch.compat import give_last_operator_cpus
from koala_batch.errors import SpecError
from koala_batch.inputs.files import InputPlan
from koala_batch.keys import KeySet
from koala_batch.runtime.session import LIGHT_TASK_CPUS, resolve_gpus_per_actor
from koala_batch.schemas import READ_COLUMNS
from koala_batch.spec import ComputeSpec, JobSpec, apply_overrides, load_spec, spec_from_dict
from koala_batch.stages.expand import ExpandImages
from koala_batch.stages.generate import CALLS_PER_ACTOR, GenerateImages, ImageRows
from koala_batch.stages.read import DatasetRows, ReadRowGroups, check_dataset_schema
from koala_batch.stages.write import WriteShard


@dataclass(frozen=True)
class Substitutes:
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


def rebundle(dataset: Any, rows: int) -> Any:
    """The dataset in blocks of exactly `rows` rows (the last one may be short).

    Ray Data's streaming repartition runs as map tasks that take a whole CPU by default
    and hold it while their output waits downstream. Two such tasks on a node whose
    CPUs the generator actors hold starve the writer until generation ends, and
    nothing is committed before then; so they are made as light as the other light
    stages. Ray 2.60's `repartition` takes no resource arguments, and no public route
    gives them: a light `map_batches` before it is not fused with it (fusion takes the
    repartition's unset `num_cpus` for 1 and refuses the pair), `map_batches` alone
    leaves a short batch per task, and block sizing is in bytes. So the logical operator
    it adds is given them directly (`compat.give_last_operator_cpus`).
    """
    dataset = dataset.repartition(target_num_rows_per_block=rows, strict=True)
    give_last_operator_cpus(dataset, "StreamingRepartition", LIGHT_TASK_CPUS)
    return dataset


def retry_args(compute: ComputeSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Ray retry options of the light tasks and of the generator actors
    (compute.max_task_retries, compute.max_actor_restarts); Ray Data's defaults if unset."""
    task_args: dict[str, Any] = {}
    actor_args: dict[str, Any] = {}
    if compute.max_task_retries is not None:
        task_args["max_retries"] = compute.max_task_retries
        actor_args["max_task_retries"] = compute.max_task_retries
    if compute.max_actor_restarts is not None:
        actor_args["max_restarts"] = compute.max_actor_restarts
    return task_args, actor_args


def build_dataset(
    spec: JobSpec,
    plan: InputPlan,
    committed_keys: KeySet | None = None,
    *,
    run_id: str | None = None,
    substitutes: Substitutes | None = None,
    collector: Any = None,
):
    """The Ray Data graph of a job, top to bottom: read -> `generate_images` -> write; its
    rows are per-shard stats."""
    import ray.data

    substitutes = substitutes or Substitutes()
    task_args, _ = retry_args(spec.compute)
    units = plan.read_units()

    # Light stages run as tasks: their instances are built here and shipped to each task.
    dataset = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    dataset = dataset.map_batches(
        ReadRowGroups(spec.input, substitutes.input_filesystem),
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=LIGHT_TASK_CPUS,
        **task_args,
    )
    dataset = generate_images(
        dataset, spec, skip_keys=committed_keys, substitutes=substitutes, collector=collector
    )
    # Blocks of exactly rows_per_shard images: one block, one shard.
    dataset = rebundle(dataset, spec.output.rows_per_shard)
    dataset = dataset.map_batches(
        WriteShard(spec, substitutes.output_filesystem, run_id),
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=LIGHT_TASK_CPUS,
        **task_args,
    )
    return dataset


# What a spec given to generate_images as a dict or file gets for input.uri and
# output.uri, which it does not use: a protocol no filesystem has, so a use would fail.
UNUSED_URIS = ("input.uri=unused://generate_images", "output.uri=unused://generate_images")


def generation_spec(spec: JobSpec | dict[str, Any] | str | Path) -> JobSpec:
    """A JobSpec for `generate_images` from a JobSpec, a raw dict or a YAML path, where
    input.uri and output.uri may be left out (they are set to `UNUSED_URIS`); every
    other field is validated as for a job."""
    if isinstance(spec, JobSpec):
        return spec
    if isinstance(spec, dict):
        return spec_from_dict(apply_overrides(spec, list(UNUSED_URIS)))
    return load_spec(spec, list(UNUSED_URIS))


def check_dataset_columns(dataset: Any, spec: JobSpec) -> None:
    """Refuse at once a Dataset whose schema Ray Data knows without running anything and
    that cannot serve the spec (`read.check_dataset_schema`); the stage checks the others."""
    schema = dataset.schema(fetch_if_missing=False)
    if schema is None or not all(isinstance(t, pa.DataType) for t in schema.types):
        return
    arrow = pa.schema(list(zip(schema.names, schema.types, strict=True)))
    if not all(column in arrow.names for column in READ_COLUMNS):
        check_dataset_schema(arrow, spec.input)


def generate_images(
    dataset: Any,
    spec: JobSpec | dict[str, Any] | str | Path,
    *,
    skip_keys: KeySet | None = None,
    substitutes: Substitutes | None = None,
    collector: Any = None,
) -> Any:
    """A ray.data.Dataset of prompt rows in, a Dataset of generated images out, lazily.

    The rows in carry the spec's input columns: input.prompt_column, input.id_column and
    the negative prompt, seed, parameter and passthrough columns it names. Each becomes
    its images' rows: `schemas.IMAGE_ROW_SCHEMA` (the `image` bytes, null for an error
    row, and every manifest column but `shard` and `member`, which only a writer knows),
    then the passthrough columns. An image that cannot be made is a row with status
    `error` and the reason, as in a job's manifest.

    Keys and seeds are those a job gives the same ids and spec (`keys.sample_key`,
    `keys.image_seed`). A Dataset's rows have no file or position: they need
    input.id_column (SpecError or InputError otherwise, at once when Ray Data knows the
    schema without running anything), and their `source`, `row_index` and `ordinal` are
    null. Ids must be unique, as in a job's input.

    `spec`: a JobSpec, a dict or a YAML path (`generation_spec`: input.uri and output.uri
    are not used and may be left out). Generation runs as a job's does: compute.actors
    generator actors of compute.num_cpus_per_actor CPUs and compute.num_gpus_per_actor
    GPUs, compute.batch_size prompts per call, compute's retry settings. Nothing runs
    until the result is consumed, in the caller's Ray session (compute.ray_address and
    the local_* settings, which make a job's session, are not used); with
    num_gpus_per_actor `auto`, connect (`ray.init`) before calling. A job's graph is this
    function between its reader and its writer: `skip_keys` leaves out the images of those
    keys (a resumed job's committed ones), `substitutes.generator_cls` replaces the generator
    and `collector` (an actor handle) receives its statistics.
    """
    import ray
    import ray.data

    spec = generation_spec(spec)
    substitutes = substitutes or Substitutes()
    compute = spec.compute
    check_dataset_columns(dataset, spec)
    if compute.num_gpus_per_actor == "auto" and not ray.is_initialized():
        raise SpecError(
            "generate_images: compute.num_gpus_per_actor is auto, which asks the Ray cluster "
            "whether it has GPUs, but this process is not connected to one: call ray.init() "
            "first, or set compute.num_gpus_per_actor"
        )
    task_args, actor_args = retry_args(compute)
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
    # Same resources as the read stage before it, so Ray Data runs them as one task.
    dataset = dataset.map_batches(
        DatasetRows(spec.input),
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=LIGHT_TASK_CPUS,
        **task_args,
    )
    dataset = dataset.map_batches(
        ExpandImages(spec, skip_keys),
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=LIGHT_TASK_CPUS,
        **task_args,
    )
    # Blocks of exactly one pipeline call, so every actor gets work (a whole Parquet
    # file would otherwise feed a single actor).
    # With per-row generation parameters, a batch whose rows fall in several buckets
    # (width, height, steps, guidance, negative or not) takes one pipeline call per
    # bucket. ExpandImages sorts each block by bucket, so the cuts here give batches of
    # one bucket except where a bucket ends: there one batch holds the end of one bucket
    # and the start of the next, and makes two smaller calls. The limit: buckets are
    # sorted within a block (a row group), not across blocks; grouping across blocks
    # would take an all-to-all shuffle, which would hold every image back until the whole
    # input was read. Inputs sorted by size (or large row groups) keep batches full.
    dataset = rebundle(dataset, compute.batch_size)
    dataset = dataset.map_batches(
        ImageRows,
        fn_constructor_kwargs={
            "generator_cls": substitutes.generator_cls,
            "spec": spec,
            "torch_threads": compute.torch_threads or max(1, int(compute.num_cpus_per_actor)),
            "collector": collector,
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
    return dataset


@contextmanager
def job_data_context() -> Iterator[None]:
    """The current Ray Data `DataContext` with a job's settings for the block, and the
    caller's put back after it."""
    import ray.data

    context = ray.data.DataContext.get_current()
    options = context.execution_options
    saved = (
        context.enable_progress_bars,
        options.preserve_order,
        context.raise_original_map_exception,
    )
    context.enable_progress_bars = os.environ.get("KOALA_BATCH_PROGRESS", "0") == "1"
    options.preserve_order = False
    # Surface a stage's own exception (with its notes naming the file) rather than
    # Ray's generic UserCodeException, which keeps only its text.
    context.raise_original_map_exception = True
    try:
        yield
    finally:
        (
            context.enable_progress_bars,
            options.preserve_order,
            context.raise_original_map_exception,
        ) = saved
