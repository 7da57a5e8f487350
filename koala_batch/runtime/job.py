"""The job: plan the input, claim the output, run the Ray Data graph, record success.

`build_dataset` assembles the whole graph top to bottom:
read -> validate -> generate (GPU actors) -> encode -> write and commit.
Its middle, validate to encode, is `generate_images`: public, for users who chain their
own Ray Data stages around it. This module also owns the job's Ray session; the commit
protocol and the job record live in `commit.py`.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from koala_batch.compat import kill_local_ray
from koala_batch.errors import (
    ClusterResourcesError,
    GeneratorStartError,
    InputError,
    Interrupted,
    JobFailedError,
    RunSupersededError,
    SpecError,
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
from koala_batch.runtime.console import (
    JobProgress,
    Poller,
    adopt_library_console,
    drop_native_stderr_line,
    style_library_console,
)
from koala_batch.schemas import (
    IMAGE_ROW_FIELDS,
    IMAGE_ROW_SCHEMA,
    READ_COLUMNS,
    SUMMARY_SCHEMA,
    Col,
    require_columns,
)
from koala_batch.spec import (
    ComputeSpec,
    JobSpec,
    apply_overrides,
    load_spec,
    reveal_storage_options,
    spec_from_dict,
)
from koala_batch.stages.expand import ExpandImages
from koala_batch.stages.generate import CALLS_PER_ACTOR, GenerateImages, busy_summary
from koala_batch.stages.read import DatasetRows, ReadRowGroups, check_dataset_schema
from koala_batch.stages.write import WriteShard
from koala_batch.storage import Storage

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
        # Ray Data raises the real error `from` an empty SystemException of its own: a
        # marker that the trace is internal, never a cause.
        if inner is None or type(inner).__name__ == "SystemException":
            break
        exc = inner
    return exc


def describe_failure(exc: BaseException) -> str:
    """One readable line for a failed task: the root cause and the notes naming its target."""
    cause = root_cause(exc)
    notes = "; ".join(getattr(cause, "__notes__", []))
    text = f"{type(cause).__name__}: {cause}".strip()
    return f"{text} ({notes})" if notes else text


def stage_error(exc: BaseException) -> BaseException:
    """A stage's own error as it raised it. Ray Data appends its retry advice to the
    message of a failed task's exception, on lines of their own; koala-batch's messages
    are one line, and that advice is wrong for an error that is final."""
    if exc.args and isinstance(exc.args[0], str) and "\n" in exc.args[0]:
        exc.args = (exc.args[0].split("\n", 1)[0], *exc.args[1:])
    return exc


def coerce_spec(spec: JobSpec | dict[str, Any] | str | Path) -> JobSpec:
    """Accept a JobSpec, a raw dict, or a YAML path."""
    if isinstance(spec, JobSpec):
        return spec
    if isinstance(spec, dict):
        return spec_from_dict(spec)
    return load_spec(spec)


def ray_address(spec: JobSpec) -> str | None:
    """The cluster a job joins: compute.ray_address, else $RAY_ADDRESS; None starts one."""
    return spec.compute.ray_address or os.environ.get("RAY_ADDRESS")


# Where Ray logs its token-authentication notes when it starts a local cluster.
RAY_AUTH_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def connect_ray(spec: JobSpec) -> bool:
    """Join RAY_ADDRESS / compute.ray_address, or start a local cluster; True if started here."""
    import ray

    if ray.is_initialized():
        return False
    adopt_library_console("ray")
    address = ray_address(spec)
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # Ray says on every new local cluster that it turned token authentication on
            # (its default, kept here): nothing about the job, nothing to do.
            auth_notes = logging.getLogger(RAY_AUTH_SETUP_LOGGER)
            level = auth_notes.level
            auth_notes.setLevel(logging.ERROR)
            try:
                ray.init(
                    # "local": a new cluster even where `ray start` left one on this machine
                    # (/tmp/ray/ray_current_cluster), which ray.init() would join otherwise;
                    # joining one takes RAY_ADDRESS or compute.ray_address.
                    address="local",
                    num_cpus=spec.compute.local_num_cpus or max(4, 2 * (os.cpu_count() or 1)),
                    object_store_memory=spec.compute.local_object_store_mb * 2**20,
                    include_dashboard=False,
                    # "Started a local Ray instance" tells a user nothing about the job.
                    logging_level=logging.WARNING,
                    # Worker processes' own output (a dying actor's interpreter dump, the
                    # raylet's retry notes) stays in the session folder's logs: what
                    # went wrong reaches the console as the run's last line.
                    log_to_driver=False,
                )
            finally:
                auth_notes.setLevel(level)
    except BaseException:
        # Interrupted or failed half-way: no local cluster processes may outlive the job.
        ray.shutdown()
        raise
    return True


@dataclass(frozen=True)
class ClusterView:
    """What a Ray cluster can hold, as far as it says.

    `nodes`: the total resources of each node alive now. `node_types`: the nodes its
    autoscaler may add (one node's resources, and how many at most; -1: no limit).
    `complete`: nothing else can ever join, as for a local cluster this job started, or an
    autoscaler that reports its node types; otherwise (an autoscaler that does not say,
    nodes added by hand) the cluster may still grow in ways nobody can check up front.
    """

    nodes: tuple[dict[str, float], ...]
    node_types: tuple[tuple[dict[str, float], int], ...] = ()
    complete: bool = False
    local: bool = False

    @property
    def has_gpus(self) -> bool:
        """A node has a GPU, or the autoscaler may add one that has."""
        shapes = [*self.nodes, *(resources for resources, _ in self.node_types)]
        return any(shape.get("GPU", 0) > 0 for shape in shapes)

    def describe(self) -> str:
        """The cluster in a few words, for messages."""

        def amounts(cpus: float, gpus: float) -> str:
            return f"{cpus:g} CPUs, " + (f"{gpus:g} GPUs" if gpus else "no GPU")

        cpus = sum(node.get("CPU", 0) for node in self.nodes)
        gpus = sum(node.get("GPU", 0) for node in self.nodes)
        if self.local:
            return f"the local Ray cluster ({amounts(cpus, gpus)})"
        text = f"the Ray cluster ({len(self.nodes)} node(s), {amounts(cpus, gpus)} in all"
        for resources, most in self.node_types:
            count = "any number" if most < 0 else f"up to {most}"
            shape = amounts(resources.get("CPU", 0), resources.get("GPU", 0))
            text += f"; its autoscaler may add {count} of {shape}"
        return text + ")"


def cluster_view(local: bool) -> ClusterView:
    """The cluster this process is connected to; `local`: a local one the job started."""
    import ray

    nodes = tuple(
        {name: float(amount) for name, amount in node["Resources"].items()}
        for node in ray.nodes()
        if node.get("Alive")
    )
    if local:
        return ClusterView(nodes, complete=True, local=True)
    try:
        from ray._private.state import state

        # Written by autoscaler v2 (KubeRay's `version: v2`): its node groups and their limits.
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: without it the cluster is open-ended
        config = None
    if config is None:
        return ClusterView(nodes)
    node_types = tuple(
        ({name: float(amount) for name, amount in group.resources.items()}, int(group.max_count))
        for group in config.node_group_configs
        if group.max_count != 0
    )
    return ClusterView(nodes, node_types, complete=True)


def resolve_gpus_per_actor(spec: JobSpec) -> float:
    """compute.num_gpus_per_actor, with auto = 1 when the cluster has any GPU (or its
    autoscaler may add a node with one: GPU workers often scale from zero)."""
    if spec.compute.num_gpus_per_actor == "auto":
        return 1.0 if cluster_view(local=False).has_gpus else 0.0
    return float(spec.compute.num_gpus_per_actor)


def actors_on_node(
    resources: dict[str, float], cpus: float, gpus: float, reserve: float = 0.0
) -> int:
    """How many actors of `cpus` CPUs and `gpus` GPUs one node holds, `reserve` CPUs aside."""
    # The tolerance keeps 3 x 0.1 CPU within 0.3 CPU.
    most = math.floor((resources.get("CPU", 0.0) - reserve) / cpus + 1e-9)
    if gpus > 0:
        most = min(most, math.floor(resources.get("GPU", 0.0) / gpus + 1e-9))
    return max(0, most)


def describe_demand(actors: int, cpus: float, gpus: float) -> str:
    """The resources the generator actors and one light task need, for messages."""
    return (
        f"{actors} generator actor(s) of {cpus:g} CPU and {gpus:g} GPU each (compute.actors or "
        "its min, compute.num_cpus_per_actor, compute.num_gpus_per_actor), plus "
        f"{LIGHT_TASK_CPUS:g} CPU beside them for the read and write tasks"
    )


def placement_problem(view: ClusterView, actors: int, cpus: float, gpus: float) -> str | None:
    """Why `actors` generator actors of `cpus` CPUs and `gpus` GPUs each, and one light task
    beside them, can never be placed on the cluster (one line, saying what to change); None
    if they can, or if the cluster may yet grow in ways it does not report."""
    if not view.complete:
        return None
    shapes = list(view.nodes)
    for resources, most in view.node_types:
        shapes += [resources] * (actors + 1 if most < 0 else min(most, actors + 1))
    need = f"compute asks for {describe_demand(actors, cpus, gpus)}, but"
    bigger = "raise compute.local_num_cpus" if view.local else "add bigger nodes"
    if gpus > 0 and not view.has_gpus:
        return (
            f"{need} no node of {view.describe()} has a GPU: set compute.num_gpus_per_actor "
            "to auto or 0"
        )
    fits = [actors_on_node(shape, cpus, gpus) for shape in shapes]
    if not any(fits):
        one = f"{cpus:g} CPUs" + (f" and {gpus:g} GPUs" if gpus else "")
        lower = "compute.num_cpus_per_actor" + (" or compute.num_gpus_per_actor" if gpus else "")
        return f"{need} no node of {view.describe()} has {one}: lower {lower}, or {bigger}"
    most = max(
        sum(fits) - fit + actors_on_node(shape, cpus, gpus, reserve=LIGHT_TASK_CPUS)
        for shape, fit in zip(shapes, fits, strict=True)
    )
    if most < actors:
        more = "raise compute.local_num_cpus" if view.local else "add nodes"
        return (
            f"{need} {view.describe()} holds at most {most} such actor(s) beside the read and "
            f"write tasks: lower compute.actors (or its min), or {more}"
        )
    return None


# How long the placement check waits silently before it says what it is waiting for.
PLACEMENT_NOTICE_S = 5.0


def wait_for_placement(spec: JobSpec, gpus: float) -> None:
    """Return once the cluster can place the minimum of generator actors and one light task
    beside them; fail after compute.actor_placement_timeout_s. Ray Data would otherwise wait
    for them forever without a word."""
    from ray.util.placement_group import placement_group, remove_placement_group

    actors = spec.compute.actor_range[0]
    cpus = spec.compute.num_cpus_per_actor
    actor = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    timeout = spec.compute.actor_placement_timeout_s
    # A trial reservation, released at once: Ray places it as it would the actors, and an
    # autoscaler adds nodes for it as it would for them.
    group = placement_group([actor] * actors + [{"CPU": LIGHT_TASK_CPUS}], strategy="PACK")
    try:
        ready = group.wait(min(PLACEMENT_NOTICE_S, timeout))
        if not ready and timeout > PLACEMENT_NOTICE_S:
            logger.warning(
                "waiting up to %g s more (compute.actor_placement_timeout_s) for %s to make "
                "room for %s",
                timeout - PLACEMENT_NOTICE_S,
                cluster_view(local=False).describe(),
                describe_demand(actors, cpus, gpus),
            )
            ready = group.wait(timeout - PLACEMENT_NOTICE_S)
    finally:
        remove_placement_group(group)
    if not ready:
        raise JobFailedError(
            f"{cluster_view(local=False).describe()} did not make room for "
            f"{describe_demand(actors, cpus, gpus)} within {timeout:g} s: lower those "
            "settings, add nodes, or raise compute.actor_placement_timeout_s"
        )


class StopRequested(KeyboardInterrupt):
    """Raised in the main thread by `SignalStop`: a KeyboardInterrupt, which Ray's waits
    (ray.get) pass on as they do a Ctrl-C, where they would swallow another exception."""


# A stop must end well within the 30 s that Kubernetes gives a pod between SIGTERM and
# SIGKILL (terminationGracePeriodSeconds), on a busy node too.
STOP_DEADLINE_S = 20.0
# What a stop gives `ray.shutdown()` of the local cluster the job started, from the first
# signal: it can wait on that cluster without end, in native code no signal reaches.
STOP_RAY_SHUTDOWN_S = 12.0


class SignalStop:
    """SIGINT and SIGTERM, turned into `StopRequested` in the main thread.

    Only the first signal raises, and only outside `held()`: a repeat (a second Ctrl-C)
    while the job stops is ignored, so that shutting the local cluster down completes; one
    that arrives within `held()` raises when the hold ends. A signal that was ignored when
    the stop was made (a job started in the background) stays ignored.

    With `on_deadline` (the CLI's, which ends the process), a thread calls it with the
    signal `deadline_s` (`STOP_DEADLINE_S`) after the first one if the stop's block has not
    ended by then, however stuck the main thread is.
    """

    def __init__(
        self,
        on_deadline: Callable[[int], None] | None = None,
        deadline_s: float | None = None,
    ) -> None:
        self.signals = [
            signum
            for signum in (signal.SIGINT, signal.SIGTERM)
            if signal.getsignal(signum) is not signal.SIG_IGN
        ]
        self.received: int | None = None
        # time.monotonic() at the first signal.
        self.since: float | None = None
        self._raised = False
        self._holds = 0
        # Within its `stop_on_signals` block: only then may an inner block reuse it.
        self.active = False
        self._signalled = threading.Event()
        self._ended = threading.Event()
        if on_deadline is not None:
            # Started now, not from the handler: a thread started there could wait for
            # threading's own lock, held by the main thread the handler interrupted.
            threading.Thread(
                target=self._watch,
                args=(on_deadline, STOP_DEADLINE_S if deadline_s is None else deadline_s),
                name="koala-batch-stop-deadline",
                daemon=True,
            ).start()

    def handle(self, signum: int, frame: object) -> None:
        """The signal handler."""
        if self.received is None:
            self.received = signum
            self.since = time.monotonic()
            self._signalled.set()
        if not self._raised and not self._holds:
            self._raised = True
            raise StopRequested(signum)

    def end(self) -> None:
        """The stop's block ended: no deadline any more."""
        self._ended.set()
        self._signalled.set()

    def seconds_left(self, within_s: float) -> float:
        """What is left (at least 1 s) of `within_s` seconds from the first signal."""
        if self.since is None:
            return within_s
        return max(1.0, self.since + within_s - time.monotonic())

    def _watch(self, on_deadline: Callable[[int], None], deadline_s: float) -> None:
        self._signalled.wait()
        if self.since is None or self._ended.wait(self.since + deadline_s - time.monotonic()):
            return
        assert self.received is not None
        on_deadline(self.received)

    def install(self) -> None:
        """Install the handler (again after ray.init, which puts in its own for SIGTERM: it
        kills the local cluster under the running job, which then aborts with a C++ stack
        dump)."""
        for signum in self.signals:
            signal.signal(signum, self.handle)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Signals wait for the end of the block."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
        if self.received is not None and not self._raised and not self._holds:
            self._raised = True
            raise StopRequested(self.received)


@contextmanager
def stop_on_signals(on_deadline: Callable[[int], None] | None = None) -> Iterator[SignalStop]:
    """Within the block SIGINT and SIGTERM raise `StopRequested` (see `SignalStop`, also
    for `on_deadline`); the handlers in place before are restored after it. Reuses an
    enclosing block's stop (the CLI's); outside the main thread, where Python cannot handle
    signals, it does nothing."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        owner = getattr(signal.getsignal(signum), "__self__", None)
        # A handler whose block has ended (left behind, spent) is no enclosing stop.
        if isinstance(owner, SignalStop) and owner.active:
            yield owner
            return
    if threading.current_thread() is not threading.main_thread():
        stop = SignalStop()
        stop.signals = []
        yield stop
        return
    stop = SignalStop(on_deadline)
    previous = {signum: signal.getsignal(signum) for signum in stop.signals}
    stop.install()
    stop.active = True
    try:
        yield stop
    finally:
        stop.active = False
        stop.end()
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def run_within(call: Callable[[], object], timeout_s: float) -> bool:
    """`call()` in a thread of its own, waited for at most `timeout_s`: whether it returned
    (or raised, logged) by then. Past that it is left to finish, or not."""
    done = threading.Event()

    def target() -> None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - the caller's thread has no use for it
            logger.debug("%r failed: %s: %s", call, type(exc).__name__, exc)
        finally:
            done.set()

    threading.Thread(target=target, name="koala-batch-bounded-call", daemon=True).start()
    return done.wait(timeout_s)


def shutdown_ray_within(timeout_s: float) -> None:
    """`ray.shutdown()`, given at most `timeout_s`; past it the processes of the local
    cluster this process started, if any, are killed, and the shutdown left behind."""
    import ray

    if not run_within(ray.shutdown, timeout_s):
        killed = kill_local_ray()
        logger.warning(
            "Ray did not shut down within %g s: %s",
            timeout_s,
            f"killed the {killed} processes of the local cluster" if killed else "left it",
        )


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

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node: a worker node can be taken away mid-job, the driver's cannot
    # without ending the job anyway. Hard affinity: Ray places a zero-CPU actor with a
    # soft one on another node (seen on Ray 2.60, every time).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return GeneratorStatsCollector.options(  # type: ignore[attr-defined]
        scheduling_strategy=here
    ).remote()


def collect_busy_summary(stats: Any, ended_at: float) -> dict[str, Any]:
    """The generators' busy summary, or an empty one if the collector cannot answer: the
    images are committed either way, and the record must still be written."""
    import ray

    try:
        return busy_summary(ray.get(stats.collect.remote(), timeout=60), ended_at)
    except Exception as exc:  # noqa: BLE001 - statistics never fail a finished job
        logger.warning("generator statistics unavailable: %s", describe_failure(exc))
        return {}


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
    overrides: Overrides | None = None,
    stats: Any = None,
):
    """The Ray Data graph of a job, top to bottom: read -> `generate_images` -> write; its
    rows are per-shard stats."""
    import ray.data

    overrides = overrides or Overrides()
    task_args, _ = retry_args(spec.compute)
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
    dataset = generate_images(
        dataset, spec, skip_keys=committed_keys, overrides=overrides, stats=stats
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


def image_rows(table: pa.Table, constants: dict[str, Any], passthrough: list[str]) -> pa.Table:
    """Generated rows as `generate_images` yields them: `IMAGE_ROW_SCHEMA`'s columns (the
    spec's `constants` filled in; a Dataset row's ordinal, which numbers nothing, null),
    then the passthrough columns."""
    needed = [field.name for field in IMAGE_ROW_FIELDS if field.name not in constants]
    require_columns(table, [*needed, *passthrough], "image rows")
    count = table.num_rows
    columns: dict[str, Any] = {}
    for field in IMAGE_ROW_FIELDS:
        if field.name in table.column_names:
            columns[field.name] = table.column(field.name).cast(field.type)
        else:
            columns[field.name] = pa.array([constants[field.name]] * count, field.type)
    if table.column(Col.SOURCE).null_count:
        # Rows without a source are a Dataset's (the read stage names every file's rows).
        columns[Col.ORDINAL] = pc.if_else(
            pc.is_null(columns[Col.SOURCE]), pa.scalar(None, pa.int64()), columns[Col.ORDINAL]
        )
    schema = IMAGE_ROW_SCHEMA
    for name in passthrough:
        columns[name] = table.column(name)
        schema = schema.append(table.schema.field(name))
    return pa.table(columns, schema=schema)


class ImageRows:
    """Actor stage of `generate_images`: the generator (`generator_cls`, built with the
    other arguments), its rows shaped by `image_rows`."""

    def __init__(self, generator_cls: type[GenerateImages], spec: JobSpec, **generator_args: Any):
        self.constants = spec.spec_constants()
        self.passthrough = list(spec.input.passthrough_columns)
        # An actor whose constructor raises dies, and Ray Data ends the job with the
        # death's remote traceback and the raylet's retry notes on the console. Failing
        # the actor's first batch instead ends it (Ray Data retries no actor task that
        # raises) with one line: what the constructor raised. Ray Data would end the job
        # on that first death too (DataContext.max_consecutive_actor_init_deaths = 0).
        self.start_error: str | None = None
        try:
            self.generator: GenerateImages | None = generator_cls(spec=spec, **generator_args)
        except Exception as exc:
            logger.exception("the generator could not start")  # the traceback: worker log
            self.generator = None
            where = f"{socket.gethostname()}:{os.getpid()}"
            message = " ".join(str(exc).split()).rstrip(".")
            self.start_error = f"{where}: {type(exc).__name__}: {message}"

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.generator is None:
            raise GeneratorStartError(
                f"a generator actor could not start on {self.start_error}; fix what it "
                "names (`koala-batch validate SPEC` checks the model), then rerun the same spec"
            )
        return image_rows(self.generator(table), self.constants, self.passthrough)


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
    overrides: Overrides | None = None,
    stats: Any = None,
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
    keys (a resumed job's committed ones), `overrides.generator_cls` replaces the generator
    and `stats` (an actor handle) receives its statistics.
    """
    import ray
    import ray.data

    spec = generation_spec(spec)
    overrides = overrides or Overrides()
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
            "generator_cls": overrides.generator_cls,
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
    return dataset


def quiet_ray_data_console() -> None:
    """Ray Data's own lines (its execution plan, "Progress bars disabled") to its log file
    in the session folder only: on the console, a user reads koala-batch's lines about the
    job."""
    import ray.data  # noqa: F401 - configures Ray Data's loggers on import

    try:
        from ray._private.log import PlainRayHandler
    except ImportError:  # a private name: without it, Ray Data keeps its console lines
        return
    # Its errors too: each reaches the driver as the exception that koala-batch words as
    # the run's last line, and Ray Data's own "Full stack trace" lines before it would
    # only bury that line. They stay in ray-data.log in the session folder.
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, PlainRayHandler):
            handler.setLevel(logging.CRITICAL)
    style_library_console("ray.data")


def _configure_ray_data() -> None:
    import ray.data

    quiet_ray_data_console()
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
    planned: KeySet,
    run_id: str | None = None,
    overrides: Overrides | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the Ray Data graph over the planned keys that are not committed: the stats of
    the shards it wrote and the generators' busy summary (with the GPUs each actor
    reserved).

    SIGINT or SIGTERM stops it: the local cluster is shut down and `Interrupted` says how
    many of the planned images are committed (every committed shard is kept for the
    rerun).
    """
    written: list[dict[str, Any]] = []
    with stop_on_signals() as stop:
        try:
            generators = _run_graph(
                spec, plan, committed, planned, run_id, overrides, stop, written
            )
        except KeyboardInterrupt:
            signum = stop.received or signal.SIGINT
            with stop.held():
                now = committed_keys_now(spec, overrides, committed, written)
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
    overrides: Overrides | None,
    committed: CommittedState,
    written: list[dict[str, Any]],
) -> KeySet | None:
    """The keys committed under the output now: those the run started with, those of the
    shards it saw committed, and those of shards committed since (writers may commit after
    the driver stopped listening), read from their manifests. None if the output cannot
    be read."""
    overrides = overrides or Overrides()
    known = set(committed.shards) | {shard["shard"] for shard in written}
    try:
        storage = Storage(
            spec.output.uri,
            reveal_storage_options(spec.output.storage_options),
            overrides.output_filesystem,
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


# Ray's core worker says this, once per process, for every Ray Data actor pool: Ray Data
# puts an operator's UDF and context in the object store and hands the actors references,
# and gives them max_restarts=-1 (ray-project/ray#57733). Nothing koala-batch passes can
# avoid it short of actors that never restart. Ray Data keeps the references for the
# whole job, so what the note warns of cannot happen while the job runs. It also stays in
# the driver's log in the Ray session folder (python-core-driver-*.log).
RAY_DATA_ACTOR_ARGS_NOTE = re.compile(
    rb"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*has constructor arguments "
    rb"in the object store and max_restarts > 0"
)
# How often the driver asks the generators' statistics how many images they made.
PROGRESS_POLL_S = 2.0


def poll_progress(progress: JobProgress, stats: Any) -> Poller:
    """Feed `progress` the images the generators made (not yet committed) from the stats
    collector, in a thread: the driver loop blocks until the next shard commits."""
    import ray

    def poll() -> None:
        snapshots = ray.get(stats.collect.remote(), timeout=5 * PROGRESS_POLL_S)
        firsts = [s["first_call_at"] for s in snapshots if s["first_call_at"] is not None]
        progress.set_generated(sum(s["images"] for s in snapshots), min(firsts, default=None))
        progress.report()

    return Poller(poll, PROGRESS_POLL_S, logger).start()


def _run_graph(
    spec: JobSpec,
    plan: InputPlan,
    committed: CommittedState,
    planned: KeySet,
    run_id: str | None,
    overrides: Overrides | None,
    stop: SignalStop,
    written: list[dict[str, Any]],
) -> dict[str, Any]:
    """generate_remaining's work: `written` receives each shard's stats as it commits."""
    started_ray = connect_ray(spec)
    stop.install()
    poller: Poller | None = None
    quiet = ExitStack()
    try:
        _configure_ray_data()
        gpus = resolve_gpus_per_actor(spec)
        view = cluster_view(local=started_ray and ray_address(spec) is None)
        problem = placement_problem(
            view, spec.compute.actor_range[0], spec.compute.num_cpus_per_actor, gpus
        )
        if problem:
            raise ClusterResourcesError(problem)
        wait_for_placement(spec, gpus)
        stats = start_stats_collector()
        quiet.enter_context(drop_native_stderr_line(RAY_DATA_ACTOR_ARGS_NOTE))
        dataset = build_dataset(
            spec, plan, committed.keys, run_id=run_id, overrides=overrides, stats=stats
        )
        remaining = len(planned.difference(committed.keys))
        progress = JobProgress(logger, len(planned), committed.keys.overlap(planned))
        poller = poll_progress(progress, stats)
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            for shard in batch.cast(SUMMARY_SCHEMA).to_pylist():
                # Kept for the run's end as 16-byte digests, not strings: the driver holds
                # every shard's summary until then.
                shard["keys"] = KeySet.from_keys(shard["keys"] or ()).digests
                written.append(shard)
                progress.add_commit(shard["rows"], shard["errors"])
                done = progress.snapshot().done
                logger.info(
                    "committed shard %s: %d images (%d errors); %d of %d this run",
                    shard["shard"],
                    shard["rows"],
                    shard["errors"],
                    sum(s["rows"] for s in written),
                    remaining,
                    extra={
                        "event": "shard_committed",
                        "shard": shard["shard"],
                        "images": shard["rows"],
                        "errors": shard["errors"],
                        "done": done,
                        "total": len(planned),
                    },
                )
                progress.report()
        poller.stop()
        progress.report(final=True)
        generators = collect_busy_summary(stats, ended_at=time.time())
        # What the actors reserved: the run's GPU-hours (the record's `cost`) count it.
        generators["gpus_per_actor"] = gpus
    except (UsageError, JobFailedError) as exc:
        # Ray raises a stage's error as a subclass of its type whose message is the whole
        # remote traceback; `cause` holds the original, one line.
        original = getattr(exc, "cause", None)
        if isinstance(original, (UsageError, JobFailedError)):
            raise stage_error(original) from None
        raise
    except Exception as exc:
        cause = root_cause(exc)
        if isinstance(cause, InputError):
            raise stage_error(cause) from None
        if isinstance(cause, RunSupersededError):
            # Ray Data's notes on a failed task (retry advice) would mislead here.
            raise JobFailedError(
                f"{cause}: another run took it over (two runs on one output at once), so this "
                "one stopped without committing more; the other carries on"
            ) from None
        raise JobFailedError(
            f"{describe_failure(exc)}; {sum(s['rows'] for s in written)} images were committed "
            "this run and are kept: rerun the same spec to resume"
        ) from exc
    finally:
        if poller is not None:
            poller.stop(timeout_s=10.0 if stop.received is None else 2.0)
        if started_ray:
            import ray

            with stop.held():
                if stop.received is None:
                    ray.shutdown()
                else:  # stopping: bounded, the stop has a deadline
                    shutdown_ray_within(stop.seconds_left(STOP_RAY_SHUTDOWN_S))
        quiet.close()
    return generators


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
    overrides: Overrides | None = None,
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
    new ones. `overrides` replaces the filesystems or the generator (tests, benchmarks).
    Another live run on the same output: `OutputBusyError`, nothing written.
    """
    spec = coerce_spec(spec)
    overrides = overrides or Overrides()
    started = time.time()
    started_at = datetime.now(UTC).isoformat()

    # Input, model and output problems fail here, before Ray starts or any model loads.
    plan = plan_input(
        spec.input,
        overrides.input_filesystem,
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
        overrides.output_filesystem,
    )
    # Read-only, so that an output this job must not touch is refused before the lease
    # writes anything there; both checks run again under the lease. A missing bucket or a
    # file in the way fails here too, naming the output, rather than at the lease.
    state = check_output(storage, spec, spec.output.overwrite)
    planned = planned_keys(spec, plan, overrides.input_filesystem)
    checked: tuple[OutputListing, CommittedState] | None = None
    if state.action == "resume":
        checked = state.listing, load_committed(storage, state.listing)
        check_resume(storage, spec, plan, checked[1], planned, overrides.input_filesystem)
    storage.check_writable(JOB_FILE)
    run_id = uuid.uuid4().hex
    output = OutputRun(spec, plan, planned, storage, run_id, overrides, checked)
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
    overrides: Overrides
    # The listing and committed state read (and checked) before the lease, if any.
    checked: tuple[OutputListing, CommittedState] | None = None

    def run(self, retry_failed: bool, started: float, started_at: str) -> dict[str, Any]:
        """Claim, resume, generate what is missing, check, record."""
        start = self.resume(retry_failed)
        written: list[dict[str, Any]] = []
        generators: dict[str, Any] = {}
        if len(self.planned.difference(start.committed.keys)):
            written, generators = generate_remaining(
                self.spec, self.plan, start.committed, self.planned, self.run_id, self.overrides
            )
        final = self.settle(start.committed, written)
        check_complete(
            self.storage, self.spec, self.plan, final, self.planned, self.overrides.input_filesystem
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
            self.overrides.input_filesystem,
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
