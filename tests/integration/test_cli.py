"""The CLI through a subprocess, as users and schedulers call it."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from koala_batch.cli import main as cli
from tests.conftest import REPO_ROOT, SAMPLE_PROMPTS

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).parent / "koala-batch")
SMOKE = str(REPO_ROOT / "jobs" / "smoke.yaml")
# Ray's notes about itself, which stay off the console (its session logs keep them).
RAY_NOISE = (
    "Token authentication",
    "Started a local Ray instance",
    "Execution plan of Dataset",
    "Progress bars disabled",
    "constructor arguments in the object store",
)


def koala_batch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_the_commands():
    result = koala_batch("--help")
    assert result.returncode == 0
    for command in ("run", "validate", "verify"):
        assert command in result.stdout


def test_validate_names_the_run_holding_the_output_lease(model_cache, tmp_path):
    lease = tmp_path / "out" / "_lease" / "000000000004.json"
    lease.parent.mkdir(parents=True)
    lease.write_text(
        json.dumps(
            {
                "run_id": "nightly-1",
                "host": "gpu-head-0",
                "pid": 4242,
                "started_at": "2026-11-28T02:00:00+00:00",
                "beat": 3,
                "heartbeat_s": 10.0,
            }
        )
    )
    result = koala_batch("validate", SMOKE, "--set", f"output.uri={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    assert (
        "# output lease: held by run nightly-1 (pid 4242 on gpu-head-0, started "
        "2026-11-28T02:00:00+00:00)" in result.stdout
    )


def test_validate_prints_spec_schema_and_row_count(model_cache, tmp_path):
    result = koala_batch(
        "validate",
        SMOKE,
        "--set",
        "generation.images_per_prompt=3",
        "--set",
        f"output.uri={tmp_path / 'fresh'}",
    )
    assert result.returncode == 0, result.stderr
    assert "64 row(s), 192 image(s) planned" in result.stdout
    assert "prompt: string" in result.stdout
    assert "images_per_prompt: 3" in result.stdout
    assert "fresh: new (nothing there yet)" in result.stdout


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("generation.steps=-1", "generation.steps"),
        ("generation.stepz=4", "generation.stepz: unknown field"),
        ("compute.batch_size=many", "compute.batch_size"),
        ("output.image_format=gif", "output.image_format"),
    ],
)
def test_invalid_spec_exits_2_naming_the_field(override, expected):
    result = koala_batch("validate", SMOKE, "--set", override)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_prompt_column_exits_2_listing_columns():
    result = koala_batch("run", SMOKE, "--set", "input.prompt_column=caption")
    assert result.returncode == 2
    assert "'caption' is missing" in result.stderr
    assert "prompt (string)" in result.stderr and "parti-sample.parquet" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_spec_file_exits_2(tmp_path):
    result = koala_batch("run", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def write_spec(tmp_path: Path, output: dict) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"input": {"uri": str(SAMPLE_PROMPTS)}, "output": output}))
    return str(path)


def test_set_takes_a_text_field_as_given(tmp_path, capsys):
    # YAML would read "run #1" as "run" and a comment: the job would write elsewhere.
    spec = write_spec(tmp_path, {"uri": str(tmp_path / "elsewhere")})

    code = cli.main(["validate", spec, "--set", f"output.uri={tmp_path}/run #1"])

    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"# output file://{tmp_path}/run #1: new (nothing there yet)" in out


def test_set_of_a_number_with_a_comment_exits_2(tmp_path, capsys):
    spec = write_spec(tmp_path, {"uri": str(tmp_path / "out")})

    code = cli.main(
        ["validate", spec, "--set", "compute.batch_size=8 #was 4", "--log-format", "text"]
    )

    assert code == 2
    assert capsys.readouterr().err.startswith("koala-batch: error: --set compute.batch_size: ")


@pytest.mark.parametrize("text", ["- input: {uri: prompts.parquet}\n", "just words\n"])
def test_spec_that_is_not_a_mapping_exits_2_saying_what_a_spec_looks_like(tmp_path, text):
    spec = tmp_path / "list.yaml"
    spec.write_text(text)

    result = koala_batch("validate", str(spec), "--set", "output.uri=out/x", "--log-format", "text")

    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"koala-batch: error: invalid job spec {spec}: its top level is ")
    assert "input: {uri: prompts.parquet}" in line and "Traceback" not in result.stderr


def test_output_that_is_a_file_exits_2_saying_so(tmp_path, capsys):
    output = tmp_path / "out.tar"
    output.write_bytes(b"not a directory")
    spec = write_spec(tmp_path, {"uri": str(output)})

    for command in ("validate", "run"):
        code = cli.main([command, spec, "--log-format", "text"])
        err = capsys.readouterr().err
        assert code == 2
        assert err.strip() == (
            f"koala-batch: error: output file://{output} is a file, not a directory (prefix); "
            "choose a directory for output.uri. Nothing was written."
        )
    assert output.read_bytes() == b"not a directory"


def test_validate_checks_that_the_output_can_be_written(tmp_path, capsys):
    in_the_way = tmp_path / "file"
    in_the_way.write_text("x")
    spec = write_spec(tmp_path, {"uri": str(in_the_way / "out")})

    code = cli.main(["validate", spec, "--log-format", "text"])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"koala-batch: error: output file://{in_the_way}/out cannot be written")


def test_validate_leaves_a_new_output_as_it_was(tmp_path, capsys):
    spec = write_spec(tmp_path, {"uri": str(tmp_path / "new" / "out")})

    assert cli.main(["validate", spec]) == 0, capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def s3_output(s3_server, url: str) -> dict:
    return {"uri": url, "storage_options": s3_server.storage_options}


def test_missing_output_bucket_exits_2_naming_the_url(s3_server, tmp_path, capsys):
    url = "s3://no-such-bucket-koala/run1"
    spec = write_spec(tmp_path, s3_output(s3_server, url))

    for command in ("validate", "run"):
        code = cli.main([command, spec, "--log-format", "text"])
        err = capsys.readouterr().err
        assert code == 2, err
        (line,) = err.strip().splitlines()
        assert line.startswith(f"koala-batch: error: output {url} cannot be written (")
        assert "bucket does not exist" in line and "Create it, or fix output.uri" in line


def test_fetch_model_to_a_missing_bucket_exits_2_naming_the_url(
    s3_server, model_cache, monkeypatch, capsys
):
    import fsspec

    # What AWS_* and FSSPEC_S3_ENDPOINT_URL give fetch-model outside a test.
    monkeypatch.setitem(fsspec.config.conf, "s3", s3_server.storage_options)
    url = "s3://no-such-bucket-koala/models/tiny"

    code = cli.main(["--log-format", "text", "fetch-model", "tiny", url])

    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = err.strip().splitlines()
    assert line.startswith(f"koala-batch: error: destination {url} cannot be written (")
    assert "bucket does not exist" in line and "Create it, or fix dest" in line


def test_output_that_is_an_object_exits_2_saying_so(s3_server, s3_bucket, tmp_path, capsys):
    s3_server.filesystem().pipe_file(f"{s3_bucket}/run1", b"an object, not a prefix")
    spec = write_spec(tmp_path, s3_output(s3_server, f"s3://{s3_bucket}/run1"))

    assert cli.main(["validate", spec, "--log-format", "text"]) == 2
    assert capsys.readouterr().err.startswith(
        f"koala-batch: error: output s3://{s3_bucket}/run1 is a file, not a directory (prefix)"
    )


def test_validate_probe_leaves_nothing_in_the_bucket(s3_server, s3_bucket, tmp_path, capsys):
    spec = write_spec(tmp_path, s3_output(s3_server, f"s3://{s3_bucket}/run1"))

    assert cli.main(["validate", spec]) == 0, capsys.readouterr().err
    assert f"s3://{s3_bucket}/run1: new (nothing there yet)" in capsys.readouterr().out
    assert s3_server.filesystem().find(s3_bucket) == []


def test_run_smoke_job_then_resume(model_cache, tmp_path):
    output = tmp_path / "smoke"
    overrides = [
        "--set",
        f"output.uri={output}",
        "--set",
        "generation.width=64",
        "--set",
        "generation.height=64",
    ]
    first = koala_batch("run", SMOKE, *overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    # Ray's notes about itself stay off the console (its session logs keep them).
    for noise in RAY_NOISE:
        assert noise not in first.stderr, first.stderr[-3000:]
    # Stderr is not a terminal: JSON lines only, none of them a warning or an error.
    records = [json.loads(line) for line in first.stderr.splitlines()]
    assert {record["level"] for record in records} == {"info"}, first.stderr[-3000:]
    commits = [record for record in records if record.get("event") == "shard_committed"]
    assert [record["images"] for record in commits] == [16, 16, 16, 16]
    assert commits[0]["message"].startswith(f"committed shard {commits[0]['shard']}: 16 images")
    assert sorted(record["done"] for record in commits) == [16, 32, 48, 64]
    progress = [record for record in records if record.get("event") == "progress"]
    assert progress and progress[-1]["final"] and not any(r["final"] for r in progress[:-1])
    last = progress[-1]
    assert (last["done"], last["total"], last["failed"], last["eta_s"]) == (64, 64, 0, 0.0)
    assert last["images_per_s"] > 0
    summary = json.loads(first.stdout)
    assert summary["images_ok"] == 64 and summary["images_written_this_run"] == 64
    record = json.loads((output / "_SUCCESS").read_text())
    assert record["counts"]["shards"] == 4
    manifests = sorted((output / "manifests").glob("*.parquet"))
    assert sum(pq.read_metadata(m).num_rows for m in manifests) == 64

    checked = koala_batch("validate", SMOKE, *overrides)
    assert "resumes an earlier run of this spec (4 shard(s) committed)" in checked.stdout
    refused = koala_batch("validate", SMOKE, *overrides, "--set", "generation.seed=1")
    assert refused.returncode == 2 and "changed: seed" in refused.stderr

    again = koala_batch("run", SMOKE, *overrides)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["images_written_this_run"] == 0

    verified = koala_batch("verify", str(output), "--spec", SMOKE, *overrides)
    assert verified.returncode == 0, verified.stdout[-3000:]
    assert verified.stdout.rstrip().splitlines()[-1].startswith("OK")

    # One flipped byte inside an image: verify exits 1 naming the shard and the key.
    tar_path = sorted((output / "shards").glob("*.tar"))[0]
    data = bytearray(tar_path.read_bytes())
    data[1024] ^= 0xFF  # inside the first member's bytes (after its 512-byte header)
    tar_path.write_bytes(bytes(data))
    broken = koala_batch("verify", str(output))
    assert broken.returncode == 1
    assert tar_path.stem in broken.stdout and "sha256" in broken.stdout
    assert broken.stdout.rstrip().splitlines()[-1].startswith("FAILED")


def run_on_a_terminal(args: list[str], env: dict, timeout: float = 300) -> tuple[int, str, str]:
    """The CLI with its stderr on a pseudo-terminal, as from an interactive shell: its exit
    code, what the terminal showed, and its stdout."""
    master, terminal = pty.openpty()
    with subprocess.Popen(
        [CLI, *args],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
        env=env,
    ) as job:
        os.close(terminal)
        shown = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1.0)[0]:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the job, the terminal's last writer, is gone
                break
            if not data:
                break
            shown += data
        else:
            job.kill()
        stdout = job.stdout.read() if job.stdout else b""
        code = job.wait(timeout=60)
    os.close(master)
    return code, shown.decode(), stdout.decode()


def test_run_joins_the_cluster_named_by_ray_address(ray_local, tmp_path):
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    args = ["run", SMOKE, "--set", f"output.uri={tmp_path / 'out'}"]
    args += ["--set", "generation.width=64", "--set", "generation.height=64"]
    code, shown, stdout = run_on_a_terminal(args, env)
    assert code == 0, shown[-3000:]
    assert "Connecting to existing Ray cluster" in shown
    assert "Started a local Ray instance" not in shown
    assert json.loads(stdout)["images_ok"] == 64

    # On a terminal: the human lines, and the live progress line redrawn in place.
    assert re.search(r"INFO koala_batch.runtime.job: committed shard \S+: 16 images", shown), shown
    assert "\r\x1b[K0/64 images (0%)" in shown or "\r\x1b[K16/64 images (25%)" in shown
    # The last one stays on the terminal as an ordinary line.
    assert re.search(
        r"\r\x1b\[K64/64 images \(100%\) \| 64 generated \| [.\d]+ images/s "
        r"\| ETA 0s \| 0 failed\r?\n",
        shown,
    ), shown[-3000:]
    # Each log line starts on a cleared line, never after a progress text.
    assert not re.search(r"images \(\d+%\) \|[^\r\n\x1b]*\d{4}-\d\d-\d\d ", shown)
    for noise in (*RAY_NOISE, "core_worker", "WARNING", "Error", "ERROR"):
        assert noise not in shown, shown[-3000:]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_missing_input_fails_in_one_line_in_either_format(tmp_path, log_format):
    missing = tmp_path / "nope.parquet"
    result = koala_batch("run", SMOKE, "--set", f"input.uri={missing}", "--log-format", log_format)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    if log_format == "json":
        entry = json.loads(line)
        assert (entry["level"], entry["exit_code"]) == ("error", 2)
        line = entry["message"]
    assert line.startswith("koala-batch: error: input ") and str(missing) in line, line
