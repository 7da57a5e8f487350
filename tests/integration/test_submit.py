"""`koala-batch submit` against a real Ray head (`ray start --head` with its dashboard on
127.0.0.1), through the CLI as users call it."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO_ROOT, SAMPLE_PROMPTS, default_sigint
from tests.integration.conftest import _free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
CLI = str(BIN / "koala-batch")
HEAD_START_TIMEOUT_S = 240


def dashboard_answers(address: str) -> bool:
    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=2).close()
    except urllib.error.HTTPError:
        return True  # 401 without a token: up all the same
    except OSError:
        return False
    return True


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(head: subprocess.Popen) -> None:
    """Stop every process of the head's own group, SIGTERM first; never `ray stop`, which
    stops every Ray cluster on the machine."""
    for signum, grace_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(head.pid, signum)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace_s
        # The workers outlive `ray start` by a moment, and write their logs until then.
        while (head.poll() is None or group_alive(head.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if head.poll() is not None and not group_alive(head.pid):
            break
    head.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head(model_cache) -> Iterator[str]:
    """A Ray head with its dashboard, started as a cluster operator would; its address.

    Ray's own default of token authentication is kept (the CLI gets RAY_AUTH_MODE=token
    and the token `ray start` keeps in ~/.ray). The head runs from a folder of its own, so
    a job resolving a path against its working directory would miss the test's files.
    """
    home = Path(tempfile.mkdtemp(prefix="kb-ray-", dir="/tmp"))  # short: socket paths
    address = f"http://127.0.0.1:{_free_port()}"
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE")
    }
    # KOALA_BATCH_CACHE (model_cache) is inherited: the job's actors find the tiny model.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # SIGTERM stops it at once
    with open(home / "head.log", "wb") as log:  # the head keeps its own copy of the fd
        head = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={_free_port()}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={address.rsplit(':', 1)[1]}",
                "--include-dashboard=true",
                # Free ports where Ray has fixed defaults that another cluster may hold.
                f"--ray-client-server-port={_free_port()}",
                f"--dashboard-agent-listen-port={_free_port()}",
                "--num-cpus=4",
                "--object-store-memory=209715200",
                "--disable-usage-stats",
                f"--temp-dir={home / 'ray'}",
            ],
            cwd=home,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while not dashboard_answers(address):
            if head.poll() is not None or time.monotonic() > deadline:
                said = (home / "head.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"the Ray head did not start its dashboard at {address}:\n{said}")
            time.sleep(0.5)
        yield address
    finally:
        stop_group(head)
        shutil.rmtree(home, ignore_errors=True)


def cli_env(auth: bool = True) -> dict[str, str]:
    """The user's environment: no cluster address of its own, Ray's token mode on."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE")
    }
    if auth:
        env["RAY_AUTH_MODE"] = "token"  # the token is the one `ray start` keeps in ~/.ray
    return env


def koala_batch(
    *args: str, cwd: Path, auth: bool = True, timeout: float = 280
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, *args], cwd=cwd, env=cli_env(auth), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with a small prompt table and a spec naming it and its output by RELATIVE
    paths, as a user's project folder would."""
    work = tmp_path_factory.mktemp("work")
    (work / "data").mkdir()
    pq.write_table(pq.read_table(SAMPLE_PROMPTS).slice(0, 4), work / "data" / "prompts.parquet")
    spec = yaml.safe_load((REPO_ROOT / "jobs" / "smoke.yaml").read_text())
    spec["input"]["uri"] = "data/prompts.parquet"
    spec["generation"].update(width=32, height=32, steps=2)
    spec["compute"].update(actors=1, batch_size=4, num_cpus_per_actor=1, torch_threads=1)
    spec["output"].update(uri="out/smoke", rows_per_shard=4)
    (work / "job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return work


def test_submit_follow_runs_the_job_with_paths_relative_to_here(ray_head, workdir):
    submission_id = f"koala-test-{uuid.uuid4().hex[:8]}"

    result = koala_batch(
        "submit", "job.yaml", "--address", ray_head, "--follow", "--submission-id",
        submission_id, cwd=workdir,
    )  # fmt: skip

    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    first = result.stdout.splitlines()[0]
    assert (
        first
        == f"submitted {submission_id} to {ray_head}; following its logs (Ctrl-C leaves it running)"
    )
    # The driver's own lines, streamed: its log and the summary `run` prints.
    assert "INFO koala_batch.runtime.job: committed shard" in result.stdout, result.stdout[-3000:]
    assert '"images_ok": 4' in result.stdout
    output = workdir / "out" / "smoke"
    assert (output / "_SUCCESS").exists()
    verified = koala_batch("verify", "out/smoke", "--spec", "job.yaml", cwd=workdir)
    assert verified.returncode == 0, verified.stdout[-3000:]
    assert verified.stdout.rstrip().splitlines()[-1].startswith("OK")


def test_a_job_failing_on_the_cluster_exits_as_run_would(ray_head, workdir):
    # Valid as a spec (what submit checks); the input has no such column (what run checks).
    bad = ("--set", "input.prompt_column=nope", "--set", "output.uri=out/bad")
    local = koala_batch("run", "job.yaml", *bad, "--log-format", "text", cwd=workdir)
    assert local.returncode == 2, local.stderr[-3000:]

    result = koala_batch(
        "submit", "job.yaml", *bad, "--address", ray_head, "--follow", "--log-format", "text",
        cwd=workdir,
    )  # fmt: skip

    assert result.returncode == local.returncode, (result.stdout[-3000:], result.stderr)
    assert local.stderr.strip() in result.stdout  # the job's own last line, streamed
    (last,) = result.stderr.strip().splitlines()
    assert last.startswith("koala-batch: error: job raysubmit_")
    assert "ended with exit code 2 on the cluster" in last and "submit again" in last


def test_without_follow_it_prints_the_id_and_how_to_follow(ray_head, workdir):
    bad = ("--set", "input.prompt_column=nope", "--set", "output.uri=out/bad2")

    result = koala_batch("submit", "job.yaml", *bad, "--address", ray_head, cwd=workdir)

    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    job_id = line.split()[1]
    assert line == (
        f"submitted {job_id} to {ray_head}; follow it with `ray job logs {job_id} --address "
        f"{ray_head} --follow`, stop it with `ray job stop {job_id} --address {ray_head}`"
    )

    again = koala_batch(
        "submit", "job.yaml", *bad, "--address", ray_head, "--submission-id", job_id,
        "--log-format", "text", cwd=workdir,
    )  # fmt: skip
    assert again.returncode == 1
    (refused,) = again.stderr.strip().splitlines()
    assert refused.startswith(
        f"koala-batch: submit failed: the Ray dashboard at {ray_head} refused the job: "
    )
    assert f"{job_id} already exists" in refused


def read_until(job: subprocess.Popen, text: str, timeout: float = 120) -> str:
    """What `job` printed on stdout up to and including `text`; fails after `timeout`."""
    assert job.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        if time.monotonic() > deadline or job.poll() is not None:
            pytest.fail(f"{text!r} never came: {seen.decode(errors='replace')[-3000:]}")
        if select.select([job.stdout], [], [], 1.0)[0]:
            seen += os.read(job.stdout.fileno(), 65536)
    return seen.decode()


def test_ctrl_c_stops_following_and_leaves_the_job_running(ray_head, workdir):
    # Long enough to be still running when the signal comes: the smoke-sized job can end
    # before its first log line reaches the follower on a loaded machine (its logs then
    # arrive all at once, and the follow ends with exit 0 as the signal lands).
    args = ["submit", "job.yaml", "--set", "output.uri=out/interrupted", "--follow"]
    args += ["--set", "generation.images_per_prompt=64"]
    with subprocess.Popen(
        [CLI, *args, "--address", ray_head, "--log-format", "text"],
        cwd=workdir,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=default_sigint,
    ) as job:
        shown = read_until(job, "Running entrypoint for job ")
        job_id = shown.split()[1]
        job.send_signal(signal.SIGINT)
        code = job.wait(timeout=60)
        stderr = job.stderr.read().decode() if job.stderr else ""

    assert code == 130, stderr
    (line,) = stderr.strip().splitlines()
    assert line == (
        f"koala-batch: interrupted: stopped following job {job_id}, which goes on running on "
        f"the cluster: follow it with `ray job logs {job_id} --address {ray_head} --follow`, "
        f"stop it with `ray job stop {job_id} --address {ray_head}`"
    )
    ray = [str(BIN / "ray"), "job"]
    status = subprocess.run(
        [*ray, "status", job_id, "--address", ray_head],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert re.search(rf"Status for job '{job_id}': (PENDING|RUNNING)", status.stdout), status
    # Done with it: the head goes on to the next test.
    subprocess.run(
        [*ray, "stop", job_id, "--address", ray_head, "--no-wait"],
        env=cli_env(),
        capture_output=True,
        timeout=60,
    )


def test_a_head_asking_for_a_token_is_named(ray_head, workdir):
    result = koala_batch(
        "submit", "job.yaml", "--address", ray_head, "--log-format", "text", cwd=workdir,
        auth=False,
    )  # fmt: skip

    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        f"koala-batch: submit failed: the Ray dashboard at {ray_head} asks for a token (HTTP "
        "401): set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the cluster's token (or "
        "RAY_AUTH_TOKEN_PATH to a file holding it)"
    )
