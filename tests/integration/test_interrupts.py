"""SIGINT and SIGTERM stop a running job cleanly: one line, exit 130/143, the local Ray
cluster gone; a rerun resumes and `verify` finds the output whole."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import koala_batch
from koala_batch.output.verify import verify_output
from koala_batch.spec import spec_from_dict
from tests.conftest import REPO_ROOT, default_sigint, tiny_spec, write_prompt_table
from tests.integration.conftest import ray_temp_dir, start_local_ray

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).parent / "koala-batch")


def ray_processes(temp_dir: str, within_s: float) -> list[str]:
    """Processes whose command line names `temp_dir`, once they have had `within_s` to go."""
    deadline = time.monotonic() + within_s
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                command = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
            except OSError:  # gone meanwhile
                continue
            if temp_dir.encode() in command:
                found.append(command.replace(b"\0", b" ").decode(errors="replace")[:160])
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def koala_batch_run(spec: dict, tmp_path: Path, temp_dir: str, *args: str) -> subprocess.Popen:
    """`koala-batch run` on `spec` in a subprocess of its own, its Ray under `temp_dir`."""
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    return subprocess.Popen(
        [CLI, "--log-format", "text", "run", str(spec_path), *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_TMPDIR": temp_dir},
        preexec_fn=default_sigint,
    )


def committed_rows(output: Path) -> int:
    return sum(pq.read_metadata(path).num_rows for path in output.glob("manifests/*.parquet"))


# Kubernetes gives a pod 30 s (terminationGracePeriodSeconds) from SIGTERM to SIGKILL: a
# stop must end well within that, on a busy node too (koala_batch.runtime.job.STOP_DEADLINE_S).
STOP_LIMIT_S = 30.0


def interrupt_after_first_commit(
    spec: dict, tmp_path: Path, signum: int, times: int
) -> tuple[int, str, list[str], float]:
    """Run the job, send it `signum` `times` times once it has committed a shard of its
    own; its exit code, its stderr, the Ray processes of that run still alive 10 s on, and
    the seconds from the first signal to its exit."""
    output = Path(spec["output"]["uri"])
    before = committed_rows(output)
    with ray_temp_dir() as temp_dir:
        # What `ray start` leaves on a machine (here its cluster is gone): without
        # RAY_ADDRESS or compute.ray_address the job still starts a cluster of its own.
        # (It once tried to join it: "When connecting to an existing cluster, num_cpus and
        # num_gpus must not be provided", exit 1.)
        stale = Path(temp_dir, "ray", "ray_current_cluster")
        stale.parent.mkdir()
        stale.write_text("127.0.0.1:1")
        job = koala_batch_run(spec, tmp_path, temp_dir)
        # Stderr is read only at the end: one line per shard and Ray's start-up lines fit
        # the pipe's buffer.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and job.poll() is None:
            if committed_rows(output) > before:
                break
            time.sleep(0.05)
        assert job.poll() is None, f"the job ended before the signal:\n{job.communicate()[1]}"
        if committed_rows(output) <= before:
            job.terminate()  # stops it cleanly, its cluster too
            job.communicate(timeout=90)
            pytest.fail("the job committed no shard within 180 s")
        signalled = time.monotonic()
        for _ in range(times):  # a second Ctrl-C lands while the job is stopping
            job.send_signal(signum)
            time.sleep(0.5)
        _, stderr = job.communicate(timeout=90)
        took = time.monotonic() - signalled
        print(f"stop by {signal.Signals(signum).name} x{times}: {took:.2f} s to exit")
        return job.returncode, stderr, ray_processes(temp_dir, within_s=10), took


def test_signals_stop_the_job_cleanly_and_a_rerun_resumes(model_cache, tmp_path, caplog):
    ids = [f"row-{i:02d}" for i in range(32)]
    table = write_prompt_table(
        tmp_path / "in.parquet", [f"a harbour at dusk, {i}" for i in ids], id=ids
    )
    output = tmp_path / "out"
    spec = tiny_spec(
        str(table),
        str(output),
        input={"id_column": "id"},
        compute={"batch_size": 2},
        output={"rows_per_shard": 4},
    )

    # A double Ctrl-C, then (on the resumed run) a SIGTERM as from a scheduler.
    committed = 0
    for signum, times in ((signal.SIGINT, 2), (signal.SIGTERM, 1)):
        code, stderr, leftover, took = interrupt_after_first_commit(spec, tmp_path, signum, times)
        assert took < STOP_LIMIT_S, f"the stop took {took:.1f} s:\n{stderr[-3000:]}"

        assert code == 128 + signum, stderr[-3000:]
        assert "Traceback" not in stderr and "SIGTERM received" not in stderr, stderr[-3000:]
        said = re.fullmatch(
            rf"koala-batch: interrupted: stopped by {signal.Signals(signum).name}: (\d+) of 32 "
            r"images are committed \((\d+) this run\); rerun the same command to resume",
            stderr.strip().splitlines()[-1],
        )
        assert said, stderr[-3000:]
        assert int(said[1]) == committed_rows(output)
        assert int(said[1]) - int(said[2]) == committed
        committed = int(said[1])
        assert int(said[2]) > 0 and committed < 32
        assert not (output / "_SUCCESS").exists()
        assert not leftover, f"Ray processes left behind: {leftover}"

    # The rerun in this process, on the tests' shared cluster: a third CLI start-up would
    # test nothing more.
    start_local_ray()
    with caplog.at_level("INFO", logger="koala_batch"):
        record = koala_batch.run(spec)
    assert f"resuming: {committed} of the 32 planned images already committed" in caplog.text
    assert record["counts"]["images_written_this_run"] == 32 - committed
    report = verify_output(str(output), spec=spec_from_dict(spec))
    assert report.ok, report.format()
    assert committed_rows(output) == 32
