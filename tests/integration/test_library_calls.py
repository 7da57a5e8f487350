"""A library call leaves the caller's process as it found it: its signal handlers, its Ray
Data settings and its file descriptor 2. Only the CLI changes those."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, tiny_spec, write_prompt_table
from tests.integration.conftest import ray_temp_dir

pytestmark = pytest.mark.slow

# In a process of its own: `run` starts its own local Ray there (which puts in a SIGTERM
# handler of its own), as in a user's script.
CALLER = """
import json, os, signal, sys
import ray.data
import koala_batch

def mine(signum, frame):
    pass

signal.signal(signal.SIGINT, mine)
signal.signal(signal.SIGTERM, mine)
context = ray.data.DataContext.get_current()
context.enable_progress_bars = True
context.execution_options.preserve_order = True
context.raise_original_map_exception = False
before = os.fstat(2)
record = koala_batch.run(sys.argv[1])
after = os.fstat(2)
print(json.dumps({
    "images": record["counts"]["images_committed"],
    "sigint_is_mine": signal.getsignal(signal.SIGINT) is mine,
    "sigterm_is_mine": signal.getsignal(signal.SIGTERM) is mine,
    "data_context": [
        context.enable_progress_bars,
        context.execution_options.preserve_order,
        context.raise_original_map_exception,
    ],
    "same_fd_2": (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino),
}), flush=True)
"""


def test_run_leaves_the_callers_handlers_data_context_and_stderr_as_they_were(
    model_cache, tmp_path
):
    table = write_prompt_table(tmp_path / "in.parquet", ["a red kite", "a blue boat"])
    spec = tiny_spec(str(table), str(tmp_path / "out"))
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    with ray_temp_dir() as temp_dir:
        result = subprocess.run(
            [sys.executable, "-c", CALLER, str(spec_path)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=280,
            env={**os.environ, "RAY_TMPDIR": temp_dir},
        )
    assert result.returncode == 0, result.stderr[-3000:]
    said = json.loads(result.stdout.strip().splitlines()[-1])
    assert said == {
        "images": 2,
        "sigint_is_mine": True,
        "sigterm_is_mine": True,
        "data_context": [True, True, False],
        "same_fd_2": True,
    }
    assert Path(spec["output"]["uri"], "_SUCCESS").exists()
