"""Every user-facing error carries its exit code, and the CLI maps exceptions through it."""

from __future__ import annotations

import pytest

from koala_batch import errors
from koala_batch.cli import main as cli
from tests.conftest import SAMPLE_PROMPTS


@pytest.mark.parametrize(
    ("error", "code", "headline"),
    [
        (errors.SpecError, 2, "error"),
        (errors.InputError, 2, "error"),
        (errors.OutputConflictError, 2, "error"),
        (errors.UnsafeWeightsError, 2, "error"),
        (errors.OutputUnwritableError, 2, "error"),
        (errors.ClusterResourcesError, 2, "error"),
        (errors.JobFailedError, 1, "job failed"),
        (errors.StorageError, 1, None),
        (errors.RunSupersededError, 1, None),
        (errors.StageInputError, 1, None),
    ],
)
def test_each_error_carries_its_exit_code(error, code, headline):
    assert issubclass(error, errors.KoalaBatchError)
    assert error.exit_code == code
    assert error.headline == headline


@pytest.mark.parametrize(("signum", "code"), [(2, 130), (15, 143)])
def test_an_interrupted_job_exits_as_a_shell_reports_the_signal(signum, code):
    stopped = errors.Interrupted(signum, "stopped")
    assert isinstance(stopped, errors.KoalaBatchError)
    assert (stopped.exit_code, stopped.headline) == (code, "interrupted")


def test_cli_reports_a_usage_error_in_one_line_with_exit_2(tmp_path, capsys):
    code = cli.main(["--log-format", "text", "validate", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert code == errors.EXIT_INVALID
    assert err.strip().splitlines() == [
        f"koala-batch: error: job spec {tmp_path}/missing.yaml does not exist"
    ]


def test_cli_reports_an_output_conflict_with_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"input: {{uri: {SAMPLE_PROMPTS}}}\noutput: {{uri: {out}}}\n")

    code = cli.main(["--log-format", "text", "validate", str(spec)])

    err = capsys.readouterr().err
    assert code == errors.EXIT_INVALID
    assert err.startswith("koala-batch: error: output ") and "notes.txt" in err
    assert (out / "notes.txt").read_text() == "mine"


def test_cli_maps_any_koala_batch_error_through_its_code(monkeypatch, capsys):
    def superseded(args):
        raise errors.RunSupersededError("output now belongs to run b")

    monkeypatch.setattr(cli, "command_validate", superseded)
    code = cli.main(["--log-format", "text", "validate", "spec.yaml"])
    assert code == errors.EXIT_FAILED
    assert capsys.readouterr().err == "koala-batch: validate failed: output now belongs to run b\n"
