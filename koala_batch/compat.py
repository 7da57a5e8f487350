"""The private insides of koala-batch's dependencies that it reaches into.

Each touch here has a test in `tests/integration/test_compat.py` that fails naming it
when a dependency changes it. (Older touches still sit where they are used, in
`runtime/job.py` and `storage.py`; they move here with the package's rebuild.)
"""

from __future__ import annotations

import logging
import subprocess

logger = logging.getLogger(__name__)

# What Ray's job head answers (HTTP 500) when no dashboard agent has registered with it
# yet, as right after `ray start --head` on a busy node: "please try again later". Its
# text is the only way to tell it from a refusal.
RAY_NO_JOB_AGENT = "No available agent to submit job"


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
