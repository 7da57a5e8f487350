"""`koala-batch submit` before anything is sent: the spec that travels, paths, credentials."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from koala_batch.cli import main as cli
from koala_batch.cli import submit as submit_module
from koala_batch.cli.submit import (
    SPEC_ENV,
    build_submission,
    resolve_local_paths,
    secret_fields,
    spec_from_env,
    submission_spec,
    when_agent_ready,
)
from koala_batch.compat import RAY_NO_JOB_AGENT
from koala_batch.errors import SpecError
from koala_batch.spec import spec_from_dict
from tests.conftest import tiny_spec


def write(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def unused_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # closed again: nothing listens there


def test_relative_input_and_output_become_absolute_under_the_working_directory(tmp_path):
    raw = tiny_spec(["data/a.parquet", "./data/b/*.parquet"], "out/run1/")

    resolved = resolve_local_paths(raw, tmp_path)

    assert resolved["input"]["uri"] == [
        f"{tmp_path}/data/a.parquet",
        f"{tmp_path}/data/b/*.parquet",
    ]
    assert resolved["output"]["uri"] == f"{tmp_path}/out/run1"
    assert raw["input"]["uri"] == ["data/a.parquet", "./data/b/*.parquet"]  # a copy


def test_a_parent_directory_is_left_to_the_filesystem(tmp_path):
    resolved = resolve_local_paths(tiny_spec("../prompts.parquet", "out"), tmp_path / "jobs")

    assert resolved["input"]["uri"] == f"{tmp_path}/jobs/../prompts.parquet"


@pytest.mark.parametrize(
    "uri",
    ["s3://bucket/prompts/", "gs://bucket/p.parquet", "file:///data/p.parquet", "/data/p"],
)
def test_urls_and_absolute_paths_stay_as_they_are(tmp_path, uri):
    resolved = resolve_local_paths(tiny_spec(uri, uri), tmp_path)

    assert (resolved["input"]["uri"], resolved["output"]["uri"]) == (uri, uri)


@pytest.mark.parametrize(
    "name", ["tiny", "koala-700m", "etri-vilab/koala-700m", "s3://bucket/models/koala-700m/"]
)
def test_presets_hub_ids_and_urls_are_not_paths(tmp_path, name):
    raw = tiny_spec("p.parquet", "out", model={"name": name})

    assert resolve_local_paths(raw, tmp_path)["model"] == {"name": name}


def test_a_preset_name_is_the_preset_even_where_a_folder_has_its_name(tmp_path):
    # `run` loads the preset (tiny: the model built in code) whatever folder is here.
    (tmp_path / "tiny").mkdir()
    (tmp_path / "koala-700m").mkdir()
    for name in ("tiny", "koala-700m"):
        raw = tiny_spec("p.parquet", "out", model={"name": name})
        assert resolve_local_paths(raw, tmp_path)["model"]["name"] == name


def test_a_relative_local_model_directory_is_resolved(tmp_path):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    raw = tiny_spec("p.parquet", "out", model={"name": "models/mine", "preset": "koala-1b"})

    model = resolve_local_paths(raw, tmp_path)["model"]

    assert model == {"name": f"{tmp_path}/models/mine", "preset": "koala-1b"}


def test_a_local_copy_named_like_a_hub_id_keeps_the_presets_sampler_settings(tmp_path):
    # `run` loads an existing folder before the Hub; the id implied the preset's settings.
    (tmp_path / "etri-vilab" / "koala-700m").mkdir(parents=True)
    raw = tiny_spec("p.parquet", "out", model={"name": "etri-vilab/koala-700m"})
    before = spec_from_dict(raw)

    resolved = resolve_local_paths(raw, tmp_path)
    after = spec_from_dict(resolved)

    assert resolved["model"]["name"] == f"{tmp_path}/etri-vilab/koala-700m"
    assert after.model.settings == before.model.settings
    assert after.resolved_steps == before.resolved_steps


def test_the_sent_spec_is_the_file_with_overrides_and_paths_resolved_defaults_unset(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    spec = write(tmp_path / "job.yaml", tiny_spec("prompts.parquet", "out"))

    raw = submission_spec(spec, ["generation.seed=99", "output.overwrite=true"])

    assert raw["input"]["uri"] == f"{tmp_path}/prompts.parquet"
    assert raw["output"]["uri"] == f"{tmp_path}/out"
    assert raw["generation"]["seed"] == 99 and raw["output"]["overwrite"] is True
    # Unset fields stay unset: the cluster's koala-batch applies its own defaults.
    assert "local_object_store_mb" not in raw["compute"] and "quality" not in raw["output"]


def test_the_submission_carries_the_spec_and_nothing_else(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-only")
    raw = tiny_spec(f"{tmp_path}/p.parquet", f"{tmp_path}/out")

    submission = build_submission(raw)
    retrying = build_submission(raw, retry_failed=True)

    assert submission.runtime_env.keys() == {"env_vars"}
    assert submission.runtime_env["env_vars"].keys() == {SPEC_ENV}
    assert yaml.safe_load(submission.runtime_env["env_vars"][SPEC_ENV]) == raw
    assert "local-only" not in repr(submission)
    assert submission.entrypoint == f"koala-batch --log-format text run --spec-env {SPEC_ENV}"
    assert retrying.entrypoint == submission.entrypoint + " --retry-failed"


def test_run_reads_the_spec_from_the_variable_submit_sets(tmp_path, monkeypatch):
    raw = tiny_spec(f"{tmp_path}/p.parquet", f"{tmp_path}/out")
    monkeypatch.setenv(SPEC_ENV, build_submission(raw).runtime_env["env_vars"][SPEC_ENV])

    args = cli.build_parser().parse_args(
        ["run", "--spec-env", SPEC_ENV, "--set", "generation.seed=5", "--overwrite"]
    )
    spec = cli._load(args)

    assert spec.input.uri == f"{tmp_path}/p.parquet"
    assert spec.generation.seed == 5 and spec.output.overwrite
    assert spec_from_env(SPEC_ENV) == spec_from_dict(raw)


def test_run_spec_env_errors_name_the_variable(monkeypatch):
    monkeypatch.delenv("KOALA_TEST_NO_SPEC", raising=False)
    with pytest.raises(SpecError, match="environment variable KOALA_TEST_NO_SPEC is not set"):
        spec_from_env("KOALA_TEST_NO_SPEC")
    monkeypatch.setenv("KOALA_TEST_SPEC", "input: [unclosed")
    with pytest.raises(SpecError, match=r"job spec \$KOALA_TEST_SPEC is not valid YAML"):
        spec_from_env("KOALA_TEST_SPEC")
    monkeypatch.setenv("KOALA_TEST_SPEC", "input: {uri: p.parquet}\n")
    with pytest.raises(SpecError, match=r"\$KOALA_TEST_SPEC:\n  output: required field"):
        spec_from_env("KOALA_TEST_SPEC")


@pytest.mark.parametrize("argv", [["run"], ["run", "job.yaml", "--spec-env", SPEC_ENV]])
def test_run_takes_a_spec_file_or_spec_env_exactly_one(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)

    assert exited.value.code == 2
    assert "either a spec file or --spec-env NAME" in capsys.readouterr().err


def test_a_spec_with_credentials_is_refused_naming_every_field(tmp_path, capsys):
    raw = tiny_spec(
        "s3://in/prompts/",
        "s3://out/run1/",
        input={"storage_options": {"key": "AKIA", "secret": "abc", "endpoint_url": "http://s3"}},
        model={"name": "s3://m/koala/", "storage_options": {"token": 12345}},
    )
    raw["output"]["storage_options"] = {"client_kwargs": {"aws_session_token": "t"}}
    spec = write(tmp_path / "job.yaml", raw)
    fields = [
        "input.storage_options.key",
        "input.storage_options.secret",
        "model.storage_options.token",
        "output.storage_options.client_kwargs.aws_session_token",
    ]
    assert secret_fields(spec_from_dict(raw)) == fields

    # An address that answers nothing: a submission attempt would exit 1 instead.
    code = cli.main(["submit", spec, "--address", unused_address(), "--log-format", "text"])

    err = capsys.readouterr().err
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith("koala-batch: error: the spec holds storage credentials (")
    assert ", ".join(fields) in line
    assert "nothing was submitted" in line and "AWS_*" in line and "Kubernetes secret" in line
    for secret in ("AKIA", "abc", "12345"):
        assert secret not in line.replace("storage credentials", "")


def test_a_credential_given_with_set_is_refused_too(tmp_path, capsys):
    spec = write(tmp_path / "job.yaml", tiny_spec("p.parquet", "s3://out/run1/"))

    code = cli.main(
        ["submit", spec, "--set", "output.storage_options.secret=abc"]
        + ["--address", unused_address(), "--log-format", "text"]
    )

    assert code == 2
    assert "(output.storage_options.secret)" in capsys.readouterr().err


def test_an_invalid_spec_is_refused_before_sending_as_run_refuses_it(tmp_path, capsys):
    spec = write(tmp_path / "job.yaml", tiny_spec("p.parquet", "out"))

    code = cli.main(
        ["submit", spec, "--set", "generation.steps=-1", "--address", unused_address()]
        + ["--log-format", "text"]
    )

    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"koala-batch: error: invalid job spec {spec}: ")
    assert "generation.steps" in err


def test_an_unreachable_dashboard_exits_1_in_one_line(tmp_path, capsys):
    spec = write(tmp_path / "job.yaml", tiny_spec("p.parquet", "out"))
    address = unused_address()

    code = cli.main(["submit", spec, "--address", address, "--log-format", "text"])

    assert code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        f"koala-batch: submit failed: cannot reach the Ray dashboard at {address}"
    )
    assert line.endswith("pass --address http://HEAD:8265 of a head running the dashboard")


def test_an_address_that_is_not_a_url_exits_2(tmp_path, capsys):
    spec = write(tmp_path / "job.yaml", tiny_spec("p.parquet", "out"))

    code = cli.main(["submit", spec, "--address", "10.0.0.1:6379", "--log-format", "text"])

    assert code == 2
    assert "--address 10.0.0.1:6379: the URL of the Ray dashboard" in capsys.readouterr().err


class Answers:
    """The dashboard's answers to successive submissions, as Ray's client raises them."""

    def __init__(self, *answers: str):
        self.answers = list(answers)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        answer = self.answers.pop(0)
        if answer.startswith("raysubmit"):
            return answer
        raise RuntimeError(f"Request failed with status code 500: {answer}")


def test_a_submission_is_sent_again_while_no_job_agent_is_ready():
    no_agent = f"{RAY_NO_JOB_AGENT}, please try again later."
    answers = Answers(no_agent, no_agent, "raysubmit_123")
    assert when_agent_ready(answers, wait_s=5, retry_s=0.01) == "raysubmit_123"
    assert answers.calls == 3


def test_any_other_refusal_is_not_sent_again():
    answers = Answers("Job with submission_id nightly already exists.", "raysubmit_123")
    with pytest.raises(RuntimeError, match="already exists"):
        when_agent_ready(answers, wait_s=5, retry_s=0.01)
    assert answers.calls == 1


class Clock:
    """The submit module's clock, in virtual seconds: `sleep` moves it on at once."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_waiting_for_a_job_agent_tries_through_the_window_then_ends_with_the_answer(
    monkeypatch, caplog
):
    clock = Clock()
    monkeypatch.setattr(submit_module, "time", clock)
    no_agent = f"{RAY_NO_JOB_AGENT}, please try again later."
    answers = Answers(*[no_agent] * 100)
    with (
        caplog.at_level("INFO", logger=submit_module.__name__),
        pytest.raises(RuntimeError, match=RAY_NO_JOB_AGENT),
    ):
        when_agent_ready(answers, wait_s=10, retry_s=2)
    # Tries at 0, 2, 4, 6, 8 and 10 s: the next would start past the 10 s window.
    assert answers.calls == 6 and clock.slept == [2, 2, 2, 2, 2]
    assert [r.getMessage() for r in caplog.records] == [
        "the cluster's job agent is not ready yet; trying again"
    ]
