"""Streaming commits: shards are committed while the job runs, even with CPUs scarce."""

from __future__ import annotations

import pytest

import koala_batch
from tests.conftest import tiny_spec, write_prompt_table

pytestmark = pytest.mark.slow

# Shards that take a few seconds to generate, as real ones do (minutes on a GPU): a
# shard generated faster than a writer task starts measures Ray's task overhead instead.
ROWS_PER_SHARD = 16
SHARDS = 20


@pytest.fixture
def scarce_cpus(model_cache):
    """A local cluster whose CPUs the generator actors mostly take, as on a GPU node."""
    import ray
    import ray.data

    ray.shutdown()  # the shared local cluster, if running; ray_local restarts it later
    ray.init(
        address="local",  # as LOCAL_RAY (conftest.py): never another test process's cluster
        num_cpus=2,
        object_store_memory=200 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def test_shards_commit_while_images_are_generated(scarce_cpus, tmp_path):
    count = ROWS_PER_SHARD * SHARDS
    prompts = [f"a kite over a beach, take {i}" for i in range(count)]
    table = write_prompt_table(tmp_path / "in" / "prompts.parquet", prompts)
    spec = tiny_spec(
        str(table),
        str(tmp_path / "out"),
        generation={"width": 128, "height": 128},
        # A 1-CPU actor on 2 CPUs: one CPU left for reading, rebundling and writing (and,
        # on this 2-core machine, one core for the actor's torch thread).
        compute={"actors": 1, "batch_size": 4, "num_cpus_per_actor": 1, "torch_threads": 1},
        output={"rows_per_shard": ROWS_PER_SHARD},
    )

    record = koala_batch.run(spec)

    timeline = record["timeline"]
    assert record["counts"]["images_committed"] == count
    assert timeline["shards_committed"] == SHARDS
    generating = timeline["last_image_s"] - timeline["first_image_s"]
    # The first shard lands in the first half of generation, not in a final burst ...
    assert timeline["first_commit_s"] - timeline["first_image_s"] < generating / 2, timeline
    # ... and never is most of the job generated but uncommitted (before streaming, all of
    # it was). A few shards is typical; a new Ray worker process starting on a busy
    # machine can hold the writes back for some seconds.
    assert timeline["max_uncommitted_images"] <= count // 2, timeline
    # The record says how busy the generator was: one actor, every image it made.
    generators = record["generators"]
    assert generators["actors"] == 1 and generators["images"] == count, generators
    actor = generators["per_actor"][0]
    assert actor["calls"] >= count // 4 and actor["load_s"] > 0, actor
    # Generation is most of this job, but start-up and the tail are not.
    assert 0.2 < generators["busy_fraction"] < 1.0, generators
    assert generators["busy_fraction"] <= actor["steady_busy_fraction"] <= 1.0, actor
