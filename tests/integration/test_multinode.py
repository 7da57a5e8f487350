"""Several Ray nodes (ray.cluster_utils.Cluster, fake GPU nodes): spread work, lose a node."""

from __future__ import annotations

import json
import threading
import time

import pyarrow.parquet as pq
import pytest

import koala_batch
from koala_batch.runtime.collector import start_stats_collector
from tests.conftest import tiny_spec, write_prompt_table
from tests.integration.conftest import start_gpu_cluster, stop_cluster

pytestmark = pytest.mark.slow


@pytest.fixture
def gpu_cluster(model_cache):
    """A head node without GPUs and two worker nodes that each claim one GPU."""
    cluster, workers = start_gpu_cluster(gpu_nodes=2)
    yield cluster, workers
    stop_cluster(cluster)


def manifest_rows(output) -> list[dict]:
    return [
        row
        for path in sorted((output / "manifests").glob("*.parquet"))
        for row in pq.read_table(path).to_pylist()
    ]


def test_worker_node_removed_mid_run_output_exactly_once(gpu_cluster, tmp_path):
    import ray

    cluster, workers = gpu_cluster
    assert ray.cluster_resources().get("GPU") == 2
    collector = start_stats_collector()  # one like the job's, placed while every node lives
    assert ray.get(collector.collect.remote(), timeout=60) == []
    ids = [f"p{i:03d}" for i in range(40)]
    table = write_prompt_table(
        tmp_path / "in.parquet", [f"a castle, view {i}" for i in ids], id=ids
    )
    output = tmp_path / "out"
    spec = tiny_spec(
        str(table),
        str(output),
        input={"id_column": "id"},
        compute={"actors": {"min": 1, "max": 2}, "batch_size": 2, "gpu_hour_cost": 2.5},
        output={"rows_per_shard": 4},
    )

    outcome: dict = {}

    def run_job() -> None:
        try:
            outcome["record"] = koala_batch.run(spec)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertions below
            outcome["error"] = exc

    job = threading.Thread(target=run_job)
    job.start()
    deadline = time.time() + 120
    # Remove a GPU node (from the main thread, as Cluster requires) once shards commit.
    while time.time() < deadline and not list((output / "manifests").glob("*.parquet")):
        time.sleep(0.2)
    committed_before_removal = len(list((output / "manifests").glob("*.parquet")))
    assert committed_before_removal, "no shard committed in time"
    cluster.remove_node(workers[0])
    job.join(timeout=300)

    assert not job.is_alive()
    assert "error" not in outcome, repr(outcome.get("error"))
    assert ray.cluster_resources().get("GPU") == 1  # the node really went away
    rows = manifest_rows(output)
    assert sorted(row["id"] for row in rows) == ids
    assert all(row["status"] == "ok" for row in rows)
    assert outcome["record"]["counts"]["images_ok"] == 40
    assert committed_before_removal < outcome["record"]["counts"]["shards"]  # removed mid-run

    # GPU-hours: each actor's life times the 1 GPU it reserved (auto, on GPU nodes).
    record = outcome["record"]
    cost = record["cost"]
    lives = [actor["life_s"] for actor in record["generators"]["per_actor"]]
    assert cost["gpus_per_actor"] == 1.0 and cost["actors"] == len(lives) >= 1
    assert cost["gpu_hours"] > 0
    assert cost["gpu_hours"] == pytest.approx(sum(lives) / 3600, abs=1e-6)
    assert cost["images"] == 40 and cost["gpu_hour_cost"] == 2.5
    assert cost["cost"] == pytest.approx(cost["gpu_hours"] * 2.5, abs=1e-6)
    assert cost["cost_per_1000_images"] == pytest.approx(cost["cost"] / 40 * 1000, rel=1e-6)
    assert json.loads((output / "_SUCCESS").read_text())["cost"] == cost
    card = (output / "README.md").read_text()
    assert f"cost {cost['cost']:.4g} at 2.5 per GPU-hour" in card

    # A statistics collector stays on the driver's node: it outlives both worker nodes.
    cluster.remove_node(workers[1])
    assert ray.get(collector.collect.remote(), timeout=60) == []
