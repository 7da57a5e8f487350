"""A sentinel secret never appears in logs, manifests, the job record or exception messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

import koala_batch
from koala_batch.errors import OutputConflictError
from koala_batch.spec import load_spec
from tests.conftest import REPO_ROOT, tiny_spec

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).parent / "koala-batch")
SENTINEL = "SENTINEL-secret-7f3a9c"
SENTINEL_KEY = "AKIASENTINELKEY42"


def files_containing(root_fs, prefix: str, needle: bytes) -> list[str]:
    return [path for path in root_fs.find(prefix) if needle in root_fs.cat_file(path)]


def test_sentinel_secret_never_leaks(model_cache, s3_server, s3_bucket, tmp_path):
    fs = s3_server.filesystem()
    fs.pipe_file(
        f"{s3_bucket}/in/prompts.parquet",
        (REPO_ROOT / "jobs/data/parti-sample.parquet").read_bytes(),
    )
    secret_options = {**s3_server.storage_options, "key": SENTINEL_KEY, "secret": SENTINEL}
    spec = tiny_spec(
        f"s3://{s3_bucket}/in/",
        f"s3://{s3_bucket}/out",
        input={"id_column": "id", "storage_options": secret_options},
        output={"storage_options": secret_options, "rows_per_shard": 32},
    )
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))

    # The CLI, verbose, end to end: every log line of the driver. Its Ray under a temp dir
    # of its own (short: Ray's socket paths must fit in 107 bytes), to find its logs.
    ray_tmp = Path(tempfile.mkdtemp(prefix="kb-ray-", dir="/tmp"))
    result = subprocess.run(
        [CLI, "-v", "run", str(spec_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_TMPDIR": str(ray_tmp)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    driver_output = result.stdout + result.stderr
    for secret in (SENTINEL, SENTINEL_KEY):
        assert secret not in driver_output

    # The Ray session's own logs (workers, raylet, Ray Data) of that run.
    logs = [path for path in ray_tmp.rglob("session_*/logs") if not path.parent.is_symlink()]
    assert logs, f"no Ray session logs under {ray_tmp}"
    log_files = [p for p in logs[0].rglob("*") if p.is_file()]
    assert any(p.name.startswith("raylet") for p in log_files), log_files
    leaked = [str(p) for p in log_files if SENTINEL.encode() in p.read_bytes()]
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert leaked == []

    # Everything the job wrote: manifests, tars, _job.json, _SUCCESS.
    assert fs.exists(f"{s3_bucket}/out/_SUCCESS")
    for secret in (SENTINEL, SENTINEL_KEY):
        assert files_containing(fs, f"{s3_bucket}/out", secret.encode()) == []
    record = json.loads(fs.cat_file(f"{s3_bucket}/out/_SUCCESS"))
    assert record["spec"]["input"]["storage_options"]["secret"] == "**********"

    # The spec object and the exceptions a user sees.
    loaded = load_spec(spec_path)
    for text in (repr(loaded), str(loaded), json.dumps(loaded.snapshot())):
        assert SENTINEL not in text and SENTINEL_KEY not in text
    changed = dict(spec, generation={**spec["generation"], "seed": 8})
    with pytest.raises(OutputConflictError) as refused:
        koala_batch.run(changed)
    bad_type = subprocess.run(
        [
            CLI,
            "validate",
            str(spec_path),
            "--set",
            f"input.storage_options.secret=[{SENTINEL}]",
            "--set",
            "generation.steps=0",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad_type.returncode == 2 and "generation.steps" in bad_type.stderr
    for text in (str(refused.value), bad_type.stderr, bad_type.stdout):
        assert SENTINEL not in text and SENTINEL_KEY not in text
