"""Each private insides of a dependency that `koala_batch.compat` touches, against the
installed version: a change there fails here, naming the touch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from koala_batch.compat import (
    RAY_NO_JOB_AGENT,
    RAY_SLOW_NODE_START,
    is_slow_node_start,
    ray_data_console_handlers,
)
from tests.conftest import REPO_ROOT
from tests.integration.conftest import ray_temp_dir

pytestmark = pytest.mark.slow

# In a process of its own: it ends with its cluster killed, which this test process's
# shared cluster must not be.
KILL_LOCAL_RAY = """
import json, os, ray
from koala_batch.compat import kill_local_ray, local_ray_processes
from tests.integration.conftest import LOCAL_RAY

ray.init(**{**LOCAL_RAY, "num_cpus": 1})
processes = local_ray_processes()
names = sorted({os.path.basename(p.args[0] if isinstance(p.args, list) else p.args)
                for p in processes})
killed = kill_local_ray()
codes = [p.wait(timeout=10) for p in processes]
print(json.dumps({"names": names, "killed": killed, "codes": codes}), flush=True)
os._exit(0)
"""


def test_kill_local_ray_finds_and_kills_the_local_clusters_processes():
    with ray_temp_dir() as temp_dir:
        result = subprocess.run(
            [sys.executable, "-c", KILL_LOCAL_RAY],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
            env={**os.environ, "RAY_TMPDIR": temp_dir},
        )
    assert result.returncode == 0, result.stderr[-3000:]
    said = json.loads(result.stdout.splitlines()[-1])
    # ray._private.worker._global_node.all_processes: what a stop kills when Ray's shutdown
    # hangs (koala_batch.compat.local_ray_processes).
    assert any("gcs_server" in name for name in said["names"]), (
        f"ray._private.worker._global_node.all_processes no longer lists the GCS: {said}"
    )
    assert any("raylet" in name for name in said["names"]), said
    assert said["killed"] == len(said["codes"]) and all(code == -9 for code in said["codes"])


def test_rays_job_head_still_answers_no_agent_as_submit_expects():
    # koala_batch.compat.RAY_NO_JOB_AGENT: the answer `submit` waits out. If Ray words it
    # otherwise, a submission to a cluster still starting fails at once instead.
    from ray.dashboard.modules.job import job_head

    source = Path(job_head.__file__).read_text()
    assert RAY_NO_JOB_AGENT in source, (
        "ray.dashboard.modules.job.job_head no longer answers "
        f"{RAY_NO_JOB_AGENT!r} when no job agent is ready"
    )


def test_rays_slow_node_start_is_still_worded_as_connect_ray_expects():
    # koala_batch.compat.RAY_SLOW_NODE_START: the failure a local start tries again after.
    from ray._private import node

    source = Path(node.__file__).read_text()
    assert RAY_SLOW_NODE_START in source, (
        f"ray._private.node no longer raises {RAY_SLOW_NODE_START!r} for a node slow to start"
    )
    assert is_slow_node_start(Exception(f"{RAY_SLOW_NODE_START}. This could happen ..."))
    assert not is_slow_node_start(RuntimeError("Failed to start the dashboard"))


def test_ray_datas_console_handlers_are_still_found():
    # koala_batch.compat.ray_data_console_handlers: ray._private.log.PlainRayHandler, the
    # class of Ray Data's console handlers, which the CLI keeps its plan lines out of.
    assert ray_data_console_handlers(), (
        "ray._private.log.PlainRayHandler no longer finds Ray Data's console handlers: "
        "its plan lines would reach koala-batch's console"
    )


@pytest.mark.usefixtures("ray_local")
def test_rebundling_still_reaches_the_repartition_operator_and_gives_it_its_cpus():
    # koala_batch.compat.give_last_operator_cpus: Dataset._logical_plan.dag is the
    # StreamingRepartition that `repartition` adds, and its ray_remote_args are the ones
    # its tasks run with.
    import ray.data

    from koala_batch.runtime.graph import rebundle
    from koala_batch.runtime.session import LIGHT_TASK_CPUS

    dataset = rebundle(ray.data.range(10, override_num_blocks=3), 4)
    assert dataset._logical_plan.dag.ray_remote_args["num_cpus"] == LIGHT_TASK_CPUS
    sizes = [len(batch["id"]) for batch in dataset.iter_batches(batch_size=None)]
    assert sorted(sizes) == [2, 4, 4]
