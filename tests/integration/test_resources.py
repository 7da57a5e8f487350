"""Generator actors the cluster cannot hold: refused at once, or after a bounded wait, with
one line; never a silent hang."""

from __future__ import annotations

import shutil
import time

import pytest
import ray

import koala_batch
from koala_batch.errors import JobFailedError
from tests.conftest import tiny_spec, write_prompt_table
from tests.integration.test_interrupts import koala_batch_run, ray_processes, ray_temp_dir

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("compute.actors=100", "holds at most 3 such actor(s)"),
        ("compute.num_cpus_per_actor=64", "has 64 CPUs: lower compute.num_cpus_per_actor"),
        pytest.param(
            "compute.num_gpus_per_actor=1",
            "has a GPU: set compute.num_gpus_per_actor to auto or 0",
            marks=pytest.mark.skipif(bool(shutil.which("nvidia-smi")), reason="has a GPU"),
        ),
    ],
    ids=["actors=100", "num_cpus_per_actor=64", "num_gpus_per_actor=1"],
)
def test_impossible_actors_on_a_local_cluster_fail_at_once(
    model_cache, tmp_path, override, expected
):
    table = write_prompt_table(tmp_path / "in.parquet", ["a lighthouse"] * 4)
    output = tmp_path / "out"
    with ray_temp_dir() as temp_dir:
        result = koala_batch_run(
            tiny_spec(str(table), str(output), compute={"local_num_cpus": 4}),
            tmp_path,
            temp_dir,
            "--set",
            override,
        )
        stdout, stderr = result.communicate(timeout=180)
        leftover = ray_processes(temp_dir, within_s=15)

    assert result.returncode == 2, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("koala-batch: error: compute asks for "), stderr[-3000:]
    assert "the local Ray cluster (4 CPUs, no GPU)" in last and expected in last
    assert "Traceback" not in stderr
    assert not list(output.glob("manifests/*"))
    assert not leftover, f"Ray processes left behind: {leftover}"


def test_a_joined_cluster_without_room_gives_up_after_the_placement_timeout(ray_local, tmp_path):
    # The shared cluster is joined, not started by the job: it might grow (nodes added by
    # hand), so nothing is refused up front, but the wait for room is bounded.
    table = write_prompt_table(tmp_path / "in.parquet", ["a lighthouse"] * 4)
    output = tmp_path / "out"
    spec = tiny_spec(
        str(table), str(output), compute={"actors": 100, "actor_placement_timeout_s": 3}
    )

    started = time.monotonic()
    with pytest.raises(JobFailedError) as failure:
        koala_batch.run(spec)

    assert time.monotonic() - started < 60
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith("the Ray cluster (1 node(s), 6 CPUs, no GPU in all) did not make ")
    assert "room for 100 generator actor(s) of 1 CPU and 0 GPU each" in message
    assert "within 3 s" in message and "compute.actor_placement_timeout_s" in message
    assert not list(output.glob("manifests/*"))
    # The trial reservation is gone and the shared cluster still runs.
    assert all(group["state"] == "REMOVED" for group in ray.util.placement_group_table().values())
    assert ray.is_initialized()


def test_an_actor_range_needs_only_its_min_placed(ray_local, tmp_path):
    table = write_prompt_table(tmp_path / "in.parquet", [f"a lighthouse {i}" for i in range(8)])
    spec = tiny_spec(
        str(table),
        str(tmp_path / "out"),
        compute={"actors": {"min": 1, "max": 100}, "actor_placement_timeout_s": 30},
    )

    record = koala_batch.run(spec)

    assert record["counts"]["images_committed"] == 8
