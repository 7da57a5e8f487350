"""Bad input: row problems become error rows, schema problems fail before anything runs."""

from __future__ import annotations

import json
import posixpath
import shutil
import subprocess
import sys
import tarfile
import time
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file, save_file

import koala_batch
from koala_batch.errors import GeneratorStartError, InputError, OutputConflictError, SpecError
from koala_batch.keys import derived_seed
from koala_batch.output.verify import verify_output
from koala_batch.spec import spec_from_dict
from tests.conftest import REPO_ROOT, tiny_spec, write_prompt_table

CLI = str(Path(sys.executable).parent / "koala-batch")
# A model that cannot load: a job that reached the model preflight would fail differently.
UNLOADABLE_MODEL = {"name": "/nonexistent/model-dir"}

ROW_CASES = [
    # (id, prompt, seed, expected status, expected error fragment)
    ("null-prompt", None, None, "error", "prompt is null"),
    ("empty-prompt", "", None, "error", "prompt is empty"),
    ("blank-prompt", " \t\n ", None, "error", "prompt is empty"),
    ("long-prompt", "a very long prompt " * 527, None, "ok", None),
    ("unicode", "café au lait in Zürich, 東京の夜景", None, "ok", None),
    ("emoji", "a fox 🦊 riding a rocket 🚀", None, "ok", None),
    ("rtl", "مرحبا بالعالم and שלום עולם", None, "ok", None),
    ("control", "tab\there, bell\x07, escape\x1b[31m", None, "ok", None),
    ("nul", "before\x00after", None, "ok", None),
    ("../../etc/passwd", "a path traversal id", None, "ok", None),
    ("a/b/c", "an id with slashes", None, "ok", None),
    ("nul\x00id", "an id with a NUL", None, "ok", None),
    ("i" * 10_000, "a 10,000-character id", None, "ok", None),
    ("negative-seed", "a seeded row", -5, "error", "seed -5 is outside 0 to 2**63-1"),
    ("float-seed", "a seeded row", 2.5, "error", "not a whole number"),
    ("whole-float-seed", "a seeded row", 42.0, "ok", None),
    ("huge-seed", "a seeded row", 2**70, "error", "is outside 0 to 2**63-1"),
    ("int63-seed", "a seeded row", 2**63, "error", f"seed {2**63} is outside 0 to 2**63-1"),
    ("top-seed", "a seeded row", 2**63 - 1, "ok", None),
    ("null-seed", "a seeded row", "null", "ok", None),
]


@pytest.mark.usefixtures("ray_local")
def test_row_level_problems_become_error_rows(tmp_path):
    ids = [case[0] for case in ROW_CASES]
    seeds = [None if case[2] in (None, "null") else Decimal(case[2]) for case in ROW_CASES]
    table = write_prompt_table(
        tmp_path / "in.parquet",
        [case[1] for case in ROW_CASES],
        id=ids,
        seed=pa.array(seeds, pa.decimal128(38, 1)),
    )
    output = tmp_path / "out"
    spec = tiny_spec(
        str(table),
        str(output),
        input={"id_column": "id", "seed_column": "seed"},
        output={"max_failed_fraction": 0.5},
    )

    record = koala_batch.run(spec)

    rows = {
        row["id"]: row
        for path in sorted((output / "manifests").glob("*.parquet"))
        for row in pq.read_table(path).to_pylist()
    }
    assert sorted(rows) == sorted(ids)  # nothing dropped, nothing doubled
    for row_id, prompt, _seed, status, error in ROW_CASES:
        row = rows[row_id]
        assert row["status"] == status, (row_id, row["error"])
        assert row["prompt"] == prompt  # stored exactly as given
        if error:
            assert error in row["error"]
        else:
            assert row["error"] is None
    assert rows["long-prompt"]["prompt_truncated"] is True
    assert rows["emoji"]["prompt_truncated"] is False
    assert rows["whole-float-seed"]["seed"] == 42
    assert rows["null-seed"]["seed"] == derived_seed(7, "null-seed", 0)
    assert rows["top-seed"]["seed"] == 2**63 - 1
    assert record["counts"]["images_failed"] == 7

    # Every file stays under the output prefix and is named from hashes, not ids.
    for path in output.rglob("*"):
        assert path.resolve().is_relative_to(output.resolve())
    for tar_path in (output / "shards").glob("*.tar"):
        with tarfile.open(tar_path) as archive:
            for name in archive.getnames():
                assert posixpath.basename(name) == name and ".." not in name
                stem, _, extension = name.partition(".")
                assert all(c in "0123456789abcdef-" for c in stem), name
                if extension == "json":
                    sidecar = json.loads(archive.extractfile(name).read())
                    assert rows[sidecar["id"]]["key"] == stem


def expect_refused_before_running(spec: dict, match: str, error=InputError) -> None:
    """The job fails with `error` before it claims the output or loads a model."""
    spec["model"] = dict(UNLOADABLE_MODEL)
    with pytest.raises(error, match=match):
        koala_batch.run(spec)
    assert not Path(spec["output"]["uri"]).exists()


def test_missing_prompt_column_is_refused(tmp_path):
    table = tmp_path / "in.parquet"
    pq.write_table(pa.table({"caption": ["a cat"], "url": ["x"]}), table)
    expect_refused_before_running(
        tiny_spec(str(table), str(tmp_path / "out")),
        r"in\.parquet: prompt column 'prompt' is missing; columns present: caption \(string\), url",
    )


def test_non_string_prompt_column_is_refused(tmp_path):
    table = write_prompt_table(tmp_path / "in.parquet", [1, 2, 3])
    expect_refused_before_running(
        tiny_spec(str(table), str(tmp_path / "out")),
        r"prompt column 'prompt' has type int64, expected string",
    )


def test_empty_table_is_refused(tmp_path):
    table = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), table)
    expect_refused_before_running(tiny_spec(str(table), str(tmp_path / "out")), "holds no rows")


def test_corrupt_parquet_among_good_ones_is_named(tmp_path):
    write_prompt_table(tmp_path / "in" / "a.parquet", ["a cat"])
    write_prompt_table(tmp_path / "in" / "c.parquet", ["a dog"])
    (tmp_path / "in" / "b.parquet").write_bytes(b"PAR1 this is not parquet at all")
    expect_refused_before_running(
        tiny_spec(str(tmp_path / "in"), str(tmp_path / "out")),
        r"b\.parquet is not a readable Parquet file",
    )


def test_duplicate_ids_are_refused_naming_both_rows(tmp_path):
    write_prompt_table(tmp_path / "in" / "a.parquet", ["x", "y"], id=["one", "two"])
    write_prompt_table(tmp_path / "in" / "b.parquet", ["z"], id=["two"])
    spec = tiny_spec(str(tmp_path / "in"), str(tmp_path / "out"), input={"id_column": "id"})
    expect_refused_before_running(
        spec, r"1 duplicate id\(s\), e\.g\. 'two' at .*a\.parquet row 1 and .*b\.parquet row 0"
    )


def test_non_integer_seed_column_is_refused(tmp_path):
    table = write_prompt_table(tmp_path / "in.parquet", ["a cat"], seed=["12"])
    spec = tiny_spec(str(table), str(tmp_path / "out"), input={"seed_column": "seed"})
    expect_refused_before_running(spec, r"seed column 'seed' has type string, expected integer")


def test_output_prefix_with_foreign_files_is_refused_untouched(tmp_path):
    table = write_prompt_table(tmp_path / "in.parquet", ["a cat"])
    output = tmp_path / "out"
    output.mkdir()
    (output / "important.csv").write_text("do not touch")
    spec = tiny_spec(str(table), str(output))
    with pytest.raises(
        OutputConflictError, match=r"holds files koala-batch did not write \(important\.csv\)"
    ):
        koala_batch.run(spec)
    assert sorted(p.name for p in output.iterdir()) == ["important.csv"]
    assert (output / "important.csv").read_text() == "do not touch"


def test_unreachable_bucket_is_one_clear_message(tmp_path, s3_server):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    spec = {
        "input": {
            "uri": "s3://prompts/table.parquet",
            "storage_options": {
                **s3_server.storage_options,
                "endpoint_url": f"http://127.0.0.1:{closed_port}",
            },
        },
        "output": {"uri": str(tmp_path / "out")},
    }
    spec_path = tmp_path / "spec.json"  # JSON is YAML
    spec_path.write_text(json.dumps(spec))
    result = subprocess.run(
        [CLI, "run", str(spec_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert (
        "input s3://prompts/table.parquet: cannot list it (EndpointConnectionError" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert s3_server.secret not in result.stderr + result.stdout


def test_wrong_credentials_are_one_clear_message(tmp_path, s3_server, s3_bucket):
    from moto.core.authorization import enable_iam_authentication

    fs = s3_server.filesystem()
    fs.pipe_file(
        f"{s3_bucket}/in/table.parquet", (REPO_ROOT / "jobs/data/parti-sample.parquet").read_bytes()
    )
    spec = tiny_spec(f"s3://{s3_bucket}/in/", str(tmp_path / "out"))
    spec["input"]["storage_options"] = {
        **s3_server.storage_options,
        "key": "AKIANOSUCHKEY",
        "secret": "wrong-secret-SENTINEL",
    }
    with enable_iam_authentication(), pytest.raises(InputError) as raised:
        koala_batch.run(spec)
    message = str(raised.value)
    assert message.startswith(f"input s3://{s3_bucket}/in/: access denied")
    assert "Access Key Id you provided does not exist" in message
    assert "wrong-secret-SENTINEL" not in message


# ---------------------------------------------------------------------------------------
# issue 8, case 1: the output inside the input


def cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, "--log-format", "text", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_output_inside_the_input_is_refused_by_validate_and_run(tmp_path):
    # Once every rerun read its own manifests as new prompts: 16, 32, then 48 images,
    # each exit 0 and `verify` OK.
    data = tmp_path / "data"
    write_prompt_table(data / "in.parquet", ["a cat", "a dog"])
    spec = tiny_spec(str(data), str(data / "out"))
    spec["model"] = dict(UNLOADABLE_MODEL)
    spec_path = tmp_path / "spec.json"  # JSON is YAML
    spec_path.write_text(json.dumps(spec))
    expected = f"input.uri {data} can reach output.uri {data / 'out'}: "
    for command in ("validate", "run"):
        result = cli(command, str(spec_path))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"koala-batch: error: {expected}")
    assert not (data / "out").exists()


def test_output_inside_the_input_is_refused_on_s3(s3_server, s3_bucket):
    fs = s3_server.filesystem()
    fs.pipe_file(
        f"{s3_bucket}/data/in.parquet", (REPO_ROOT / "jobs/data/parti-sample.parquet").read_bytes()
    )
    spec = tiny_spec(f"s3://{s3_bucket}/data", f"s3://{s3_bucket}/data/out")
    for section in ("input", "output"):
        spec[section]["storage_options"] = s3_server.storage_options
    spec["model"] = dict(UNLOADABLE_MODEL)
    with pytest.raises(
        SpecError,
        match=rf"input\.uri s3://{s3_bucket}/data can reach output\.uri s3://{s3_bucket}/data/out",
    ):
        koala_batch.run(spec)
    assert fs.find(f"{s3_bucket}/data") == [f"{s3_bucket}/data/in.parquet"]


# ---------------------------------------------------------------------------------------
# issue 8, case 5: problems that were found only inside Ray


@pytest.mark.usefixtures("ray_local")
def test_prompt_that_is_not_utf8_is_an_error_row_and_verifies(tmp_path):
    # Once: `validate` OK, `run` exit 1 with a page of traceback, `verify --spec` crashed.
    prompts = pa.array([b"a cat", b"caf\xe9 au lait", b"a dog", b"a fox"], pa.binary())
    table = write_prompt_table(tmp_path / "in.parquet", prompts.view(pa.string()))
    output = tmp_path / "out"
    spec = tiny_spec(str(table), str(output), output={"max_failed_fraction": 0.5})

    record = koala_batch.run(spec)

    assert record["counts"]["images_ok"] == 3 and record["counts"]["images_failed"] == 1
    rows = [
        row
        for path in sorted((output / "manifests").glob("*.parquet"))
        for row in pq.read_table(path).to_pylist()
    ]
    bad = next(row for row in rows if row["status"] == "error")
    assert bad["row_index"] == 1 and bad["prompt"] == "caf\\xe9 au lait"
    assert bad["error"] == "prompt column 'prompt': byte 0xe9 at offset 3 is not valid UTF-8"
    report = verify_output(str(output), spec=spec_from_dict(spec))
    assert report.ok, report.format()


@pytest.mark.usefixtures("ray_local")
def test_damaged_data_page_fails_the_run_with_one_line_naming_file_and_rows(tmp_path):
    # Once: retried as if transient, then exit 1 with a last line that named no file.
    path = tmp_path / "in" / "part-0.parquet"
    path.parent.mkdir()
    prompts = [f"prompt number {i}, " * 5 for i in range(64)]
    pq.write_table(pa.table({"prompt": prompts}), path, row_group_size=32)
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)
    offset = (chunk.dictionary_page_offset or chunk.data_page_offset) + 4
    data = bytearray(path.read_bytes())
    data[offset : offset + 32] = b"\xff" * 32
    path.write_bytes(bytes(data))
    spec = tiny_spec(str(path.parent), str(tmp_path / "out"))

    with pytest.raises(InputError) as raised:
        koala_batch.run(spec)

    message = str(raised.value)
    assert message.startswith(
        f"input file {path}: row group 1 (rows 32 to 63) is unreadable: OSError: "
    )
    assert "\n" not in message


# ---------------------------------------------------------------------------------------
# issue 10, part 1: a model that cannot load


def test_a_wrong_model_name_fails_at_once_in_one_line(tmp_path):
    # Once: 549 lines of retried-actor tracebacks, then "job failed: SystemException:".
    table = write_prompt_table(tmp_path / "in.parquet", ["a cat"])
    spec = tiny_spec(str(table), str(tmp_path / "out"))
    spec["model"] = {"name": "koala-700"}
    spec_path = tmp_path / "spec.json"  # JSON is YAML
    spec_path.write_text(json.dumps(spec))

    started = time.monotonic()
    result = cli("run", str(spec_path), timeout=60)

    assert time.monotonic() - started < 30  # the bound: no cluster was started
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if "koala_batch" not in line]
    assert lines == [
        "koala-batch: error: model.name 'koala-700' is not a preset, an existing directory or "
        "a Hugging Face id (did you mean koala-700m?); presets: koala-700m, koala-1b, "
        "koala-lightning-700m, koala-lightning-1b, tiny"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("ray_local")
def test_a_model_that_cannot_load_stops_the_job_with_its_error(model_cache, tmp_path):
    from koala_batch.models.tiny import ensure_tiny_model

    model = tmp_path / "model"
    shutil.copytree(ensure_tiny_model(model_cache), model)
    (weights,) = (model / "unet").glob("*.safetensors")
    # A whole, readable file (the preflight checks that much) whose tensor has the wrong
    # shape: only loading it into the U-Net finds out.
    tensors = load_file(str(weights))
    tensors["add_embedding.linear_1.bias"] = tensors["add_embedding.linear_1.bias"][:3].copy()
    save_file(tensors, str(weights))
    table = write_prompt_table(tmp_path / "in.parquet", ["a cat", "a dog"])
    spec = tiny_spec(str(table), str(tmp_path / "out"), model={"name": str(model)})

    with pytest.raises(GeneratorStartError) as raised:
        koala_batch.run(spec)

    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("a generator actor could not start on ")
    assert "ValueError: Cannot load" in message
    assert "add_embedding.linear_1.bias expected shape torch.Size([128])" in message
    assert not list((tmp_path / "out").glob("manifests/*.parquet"))
