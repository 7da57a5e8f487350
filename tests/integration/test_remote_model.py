"""A model fetched to object storage (moto's S3) and loaded from there by generator actors
on two Ray nodes, the Hub offline."""

from __future__ import annotations

import threading

import pyarrow.parquet as pq
import pytest

import koala_batch
from koala_batch.models import weights
from koala_batch.models.tiny import ensure_tiny_model
from koala_batch.models.weights import (
    CACHE_FOLDER,
    MANIFEST_NAME,
    fetch_model,
    read_weights_manifest,
)
from tests.conftest import tiny_spec, write_prompt_table
from tests.integration.conftest import S3Server, start_gpu_cluster, stop_cluster

pytestmark = pytest.mark.slow

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture
def counted_s3(s3_server):
    """A second endpoint of the same moto S3 backend that records every request it serves,
    so a test can count what the actors downloaded."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    class QuietHandler(MotoRequestHandler):
        def log_request(self, *args, **kwargs) -> None:
            pass

    requests: list[tuple[str, str]] = []
    backend = DomainDispatcherApplication(create_backend_app)

    def recording(environ, start_response):
        requests.append((environ["REQUEST_METHOD"], environ["PATH_INFO"]))
        return backend(environ, start_response)

    server = make_server("127.0.0.1", 0, recording, threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield S3Server(endpoint_url=f"http://127.0.0.1:{server.server_port}"), requests
    server.shutdown()
    thread.join()


@pytest.fixture
def two_gpu_nodes(model_cache, tmp_path, monkeypatch):
    """A head without GPUs and two worker nodes of one (logical) GPU each, started with the
    Hub offline and an empty koala-batch cache, which every node's workers inherit."""
    node_cache = tmp_path / "node-cache"
    monkeypatch.setenv("KOALA_BATCH_CACHE", str(node_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cluster, _ = start_gpu_cluster(gpu_nodes=2)
    yield node_cache
    stop_cluster(cluster)


def test_actors_on_two_nodes_load_a_model_fetched_to_s3_downloading_it_once(
    model_cache, s3_bucket, counted_s3, two_gpu_nodes, tmp_path, monkeypatch
):
    import ray

    s3, requests = counted_s3
    node_cache = two_gpu_nodes
    url = f"s3://{s3_bucket}/models/tiny/"
    fetched = fetch_model(
        str(ensure_tiny_model(model_cache)), url, storage_options=s3.storage_options
    )
    requests.clear()  # from here on, only what the job asks
    driver_reads = []  # the driver's own manifest reads (its preflight), told apart

    def counted_read(storage, url):
        driver_reads.append(url)
        return read_weights_manifest(storage, url)

    monkeypatch.setattr(weights, "read_weights_manifest", counted_read)

    assert ray.cluster_resources().get("GPU") == 2
    ids = [f"p{i:02d}" for i in range(8)]
    table = write_prompt_table(tmp_path / "in.parquet", [f"a lighthouse, {i}" for i in ids], id=ids)
    output = tmp_path / "out"
    spec = tiny_spec(
        str(table),
        str(output),
        input={"id_column": "id"},
        model={"name": url, "storage_options": s3.storage_options},
        compute={"actors": 2, "batch_size": 2},  # one GPU each: one actor per node
        output={"rows_per_shard": 4},
    )
    record = koala_batch.run(spec)

    rows = [
        row
        for path in sorted((output / "manifests").glob("*.parquet"))
        for row in pq.read_table(path).to_pylist()
    ]
    assert sorted(row["id"] for row in rows) == ids
    assert all(row["status"] == "ok" for row in rows)
    assert record["counts"]["images_ok"] == 8

    # One cached copy, complete, beside its lock; no staging folder, no tiny model built.
    cache = node_cache / CACHE_FOLDER
    copies = [p for p in cache.iterdir() if p.is_dir()]
    assert len(copies) == 1
    assert {p.name for p in cache.iterdir()} == {copies[0].name, f"{copies[0].name}.lock"}
    assert (copies[0] / MANIFEST_NAME).is_file()
    assert len([p for p in copies[0].rglob("*") if p.is_file()]) == fetched.files + 1
    assert not (node_cache / "tiny-sdxl-v1").exists()

    # Each actor read the manifest; the weights crossed the network once.
    gets = [path for method, path in requests if method == "GET"]
    assert gets.count(f"/{s3_bucket}/models/tiny/{MANIFEST_NAME}") == 2 + len(driver_reads)
    assert gets.count(f"/{s3_bucket}/models/tiny/{UNET_WEIGHTS}") == 1
