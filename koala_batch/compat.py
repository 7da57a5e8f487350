"""The private insides of koala-batch's dependencies that it reaches into.

Nothing else in the package names a private attribute of Ray, Ray Data, fsspec or
diffusers (tests/unit/test_compat.py checks that). Each touch here has a test that fails
naming it when a dependency changes it: tests/unit/test_compat.py, and
tests/integration/test_compat.py for those that need a running Ray.
"""

from __future__ import annotations

import logging
import subprocess
from typing import Any

logger = logging.getLogger(__name__)

# What Ray's job head answers (HTTP 500) when no dashboard agent has registered with it
# yet, as right after `ray start --head` on a busy node: "please try again later". Its
# text is the only way to tell it from a refusal.
RAY_NO_JOB_AGENT = "No available agent to submit job"
# What ray.init raises when a new local node has not registered with its GCS within the
# 30 s Ray allows (hard-coded in ray._private.node), as on a machine busy with other work.
RAY_SLOW_NODE_START = "The current node timed out during startup"


def is_slow_node_start(exc: BaseException) -> bool:
    """Whether ray.init failed only because the new local node was slow to register."""
    return RAY_SLOW_NODE_START in str(exc)


def local_ray_processes() -> list[subprocess.Popen[bytes]]:
    """The processes of the local Ray cluster this process started (GCS, raylet and
    the rest; workers are the raylet's children); none if it started none or joined one.

    Touches `ray._private.worker._global_node.all_processes` (no public API lists them).
    """
    try:
        from ray._private import worker
    except ImportError:
        return []
    node = getattr(worker, "_global_node", None)
    if node is None:
        return []
    return [info.process for infos in node.all_processes.values() for info in infos]


def kill_local_ray() -> int:
    """SIGKILL the processes of the local Ray cluster this process started; how many were
    still alive. For a stop that cannot wait for `ray.shutdown()` any longer."""
    try:
        processes = local_ray_processes()
    except Exception as exc:  # noqa: BLE001 - a stop goes on without it
        logger.debug("cannot list the local Ray cluster's processes: %s", exc)
        return 0
    killed = 0
    for process in processes:
        if process.poll() is None:
            try:
                process.kill()
                killed += 1
            except OSError:  # gone meanwhile
                pass
    return killed


def ray_data_console_handlers() -> list[logging.Handler]:
    """The handlers through which Ray Data prints to the console (not its log file).

    Touches `ray._private.log.PlainRayHandler`, the class of those handlers: nothing
    public tells them from the file handler beside them. Without it, none are found and
    Ray Data keeps its console lines."""
    import ray.data  # noqa: F401 - sets up Ray Data's loggers on import

    try:
        from ray._private.log import PlainRayHandler
    except ImportError:
        return []
    return [h for h in logging.getLogger("ray.data").handlers if isinstance(h, PlainRayHandler)]


# Where Ray logs its token-authentication notes when it starts a local cluster.
RAY_AUTH_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def autoscaler_node_groups() -> Any | None:
    """The cluster's node groups and their limits as autoscaler v2 (KubeRay's `version:
    v2`) wrote them, or None where nothing says so.

    Touches `ray._private.state.state.get_cluster_config()`: no public API tells how far
    a cluster can grow."""
    try:
        from ray._private.state import state

        return state.get_cluster_config()
    except Exception:  # noqa: BLE001 - without it the cluster is open-ended
        return None


def give_last_operator_cpus(dataset: Any, operator: str, cpus: float) -> None:
    """Set the CPUs each task of the dataset's last logical operator (of class `operator`)
    reserves: for an operator whose public call takes no resource arguments.

    Touches `Dataset._logical_plan.dag` and the operator's `ray_remote_args`."""
    last = dataset._logical_plan.dag
    if type(last).__name__ != operator:
        raise RuntimeError(f"expected Ray Data's {operator}, got {last!r}")
    last.ray_remote_args["num_cpus"] = cpus


def strip_protocol(filesystem: Any, url: str) -> str:
    """The path `filesystem` (an fsspec filesystem or its class) gives `url`: the URL
    without its protocol, as that filesystem spells paths.

    Touches fsspec's `_strip_protocol`: `fsspec.core.strip_protocol` does this for the
    filesystem a URL names, not for a filesystem given (a test's, a caller's)."""
    return filesystem._strip_protocol(url)


def set_guidance_scale(pipeline: Any, scale: float) -> None:
    """Set a running StableDiffusionXLPipeline's guidance scale, which its
    `do_classifier_free_guidance` reads each step: from a step-end callback, the one way
    to turn guidance off mid-call.

    Touches the pipeline's `_guidance_scale` (diffusers' own SDXLCFGCutoffCallback does the
    same)."""
    pipeline._guidance_scale = scale
