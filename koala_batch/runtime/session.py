"""The job's Ray session: joining or starting a cluster, what it can hold, and placement."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from koala_batch.compat import (
    RAY_AUTH_SETUP_LOGGER,
    autoscaler_node_groups,
    is_slow_node_start,
    kill_local_ray,
)
from koala_batch.errors import JobFailedError
from koala_batch.runtime.signals import run_within
from koala_batch.spec import JobSpec

logger = logging.getLogger(__name__)


def ray_address(spec: JobSpec) -> str | None:
    """The cluster a job joins: compute.ray_address, else $RAY_ADDRESS; None starts one."""
    return spec.compute.ray_address or os.environ.get("RAY_ADDRESS")


# CPUs reserved by each task of the light stages: reading, the two rebundlings, writing.
LIGHT_TASK_CPUS = 0.25
# What a node must keep beside its generator actors for one task of each light stage to
# run at once: with less, one of them waits for generation to end, and so do the commits.
CPUS_BESIDE_ACTORS = 4 * LIGHT_TASK_CPUS
# Tries at starting a local cluster: Ray gives a new node 30 s to register (not a
# setting), and the node's raylet waits as long for its dashboard agent, a Python process
# importing much of Ray. On a machine busy with other work the agent's start outlasted
# both, twice in a row once (a CI run's 2 cores at a load of 8).
LOCAL_START_TRIES = 3


def connect_ray(spec: JobSpec) -> bool:
    """Join RAY_ADDRESS / compute.ray_address, or start a local cluster; True if this call
    connected (the job then leaves Ray at its end), False if Ray was connected already."""
    import ray

    if ray.is_initialized():
        return False
    address = ray_address(spec)
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            start_tolerating_slow_node(lambda: start_local_ray(spec))
    except BaseException:
        # Interrupted or failed half-way: no local cluster processes may outlive the job.
        ray.shutdown()
        raise
    return True


def start_tolerating_slow_node(start: Callable[[], object]) -> None:
    """`start()`, a new local Ray cluster, started again (up to `LOCAL_START_TRIES` in all)
    where it failed only because its node was slow to register; a last such failure ends
    in one line saying what to do."""
    import ray

    for attempt in range(1, LOCAL_START_TRIES + 1):
        try:
            start()
            return
        except Exception as exc:
            ray.shutdown()
            if not is_slow_node_start(exc):
                raise
            if attempt == LOCAL_START_TRIES:
                raise JobFailedError(
                    f"the local Ray cluster did not start: {exc}; the machine is busier "
                    "than Ray allows for (30 s for a node to register): rerun once other "
                    "work is done, or give Ray fewer CPUs (compute.local_num_cpus)"
                ) from None
            logger.info("the local Ray cluster was slow to start; starting it again")


def start_local_ray(spec: JobSpec) -> None:
    """A new local Ray cluster of compute.local_* resources, quiet on the console."""
    import ray

    # Ray says on every new local cluster that it turned token authentication on (its
    # default, kept here): nothing about the job, nothing to do.
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
            # Worker processes' own output (a dying actor's interpreter dump, the raylet's
            # retry notes) stays in the session folder's logs: what went wrong reaches the
            # console as the run's last line.
            log_to_driver=False,
        )
    finally:
        auth_notes.setLevel(level)


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
    config = autoscaler_node_groups()
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
