"""Real Ray (a local cluster shared by the session) and a real S3 server (moto, over HTTP)."""

from __future__ import annotations

import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

# address="local": a cluster of this process's own even while another test process (the
# suite runs two at a time) has a ray.cluster_utils.Cluster up, whose address
# ray.init() would otherwise join (/tmp/ray/ray_current_cluster).
LOCAL_RAY = dict(
    address="local",
    num_cpus=6,
    object_store_memory=300 * 2**20,
    include_dashboard=False,
    log_to_driver=False,
)


@contextmanager
def ray_temp_dir() -> Iterator[str]:
    """A Ray temp dir (RAY_TMPDIR) for one run, so that its processes can be told apart from
    every other Ray on the machine; short, for Ray's socket paths must fit in 107 bytes."""
    path = tempfile.mkdtemp(prefix="kb-ray-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def start_local_ray() -> None:
    """Start the shared local Ray cluster unless one is running (multi-node tests stop it),
    as a job starts its own: once more where the node was slow to register (the suite runs
    beside other work on two cores)."""
    import ray
    import ray.data

    from koala_batch.runtime.session import start_tolerating_slow_node

    if not ray.is_initialized():
        start_tolerating_slow_node(lambda: ray.init(**LOCAL_RAY))
    ray.data.DataContext.get_current().enable_progress_bars = False


def start_gpu_cluster(gpu_nodes: int = 2) -> tuple[Any, list[Any]]:
    """A `ray.cluster_utils.Cluster` of a head without GPUs and `gpu_nodes` worker nodes of
    one (logical) GPU each, this process connected to it; the shared local cluster is
    stopped first (`ray_local` starts it again). Stop it with `stop_cluster`."""
    import ray
    import ray.data
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 3,
            "object_store_memory": 150 * 2**20,
            "include_dashboard": False,
        },
    )
    workers = [
        cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=100 * 2**20)
        for _ in range(gpu_nodes)
    ]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return cluster, workers


def stop_cluster(cluster: Any) -> None:
    """Disconnect from a `start_gpu_cluster` cluster and stop its nodes."""
    import ray

    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def ray_local(model_cache):
    """A local Ray cluster with more logical CPUs than cores, so tasks are never starved.

    Started once and reused by every test; a test that needs its own cluster shuts it
    down, and the next test that asks for this one starts it again.
    """
    start_local_ray()
    yield


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    key: str = "testing-key"
    secret: str = "testing-secret"

    @property
    def storage_options(self) -> dict:
        return {"key": self.key, "secret": self.secret, "endpoint_url": self.endpoint_url}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1: real HTTP, real s3fs, no network beyond loopback."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket name for one test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.filesystem().mkdir(name)
    return name
