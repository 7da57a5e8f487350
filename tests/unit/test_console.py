"""The console: progress lines, JSON records, the live line, the final failure line."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import warnings
from datetime import datetime

import pytest

from koala_batch.cli import main as cli
from koala_batch.runtime import console as progress
from koala_batch.runtime.console import (
    RAY_DATA_ACTOR_ARGS_NOTE,
    ConsoleHandler,
    JobProgress,
    JsonFormatter,
    LiveLine,
    failure_line,
    format_duration,
    progress_snapshot,
    resolve_log_format,
)

# As Ray 2.60's core worker prints it (its ID shortened).
RAY_NOTE = (
    b"[2026-11-28 00:57:47,543 E 18397 18397] core_worker.cc:2465: Actor with class name: "
    b"'MapWorker(MapBatches(GenerateImages))' and ID: 'e7c5e4c0dd01000000' has constructor "
    b"arguments in the object store and max_restarts > 0. If the arguments in the object "
    b"store go out of scope or are lost, the actor restart will fail. See "
    b"https://github.com/ray-project/ray/issues/53727 for more details.\n"
)


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def no_console(monkeypatch):
    """Each test starts without a configured console and leaves none behind."""
    monkeypatch.setattr(progress, "_console", None)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "?"), (0, "0s"), (42.4, "42s"), (60, "1m00s"), (185, "3m05s"), (7620, "2h07m")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_snapshot_rate_and_eta_count_this_runs_images_since_the_first():
    snapshot = progress_snapshot(
        total=100,
        committed_before=20,
        committed=10,
        generated=30,
        failed=2,
        first_image_at=1000.0,
        now=1010.0,
    )
    assert snapshot.done == 30  # committed, this run and before
    assert snapshot.images_per_s == pytest.approx(3.0)  # 30 made in 10 s
    assert snapshot.eta_s == pytest.approx(50 / 3.0)  # 100 - 20 before - 30 made
    assert snapshot.text() == (
        "30/100 images (30%) | 30 generated | 3.00 images/s | ETA 17s | 2 failed"
    )
    assert snapshot.fields() == {
        "event": "progress",
        "done": 30,
        "total": 100,
        "generated": 30,
        "failed": 2,
        "images_per_s": 3.0,
        "eta_s": 16.7,
    }


def test_snapshot_before_the_first_image_has_no_rate_and_no_eta():
    snapshot = progress_snapshot(
        total=64, committed_before=0, committed=0, generated=0, failed=0, first_image_at=None, now=5
    )
    assert (snapshot.images_per_s, snapshot.eta_s) == (None, None)
    assert "? images/s | ETA ?" in snapshot.text()


def test_snapshot_counts_commits_the_generators_did_not_report_and_ends_at_eta_zero():
    # Error rows are committed but never counted by the generators as made.
    snapshot = progress_snapshot(
        total=64, committed_before=0, committed=64, generated=60, failed=4, first_image_at=0, now=8
    )
    assert (snapshot.done, snapshot.generated, snapshot.eta_s) == (64, 64, 0.0)
    assert snapshot.images_per_s == pytest.approx(8.0)


def test_job_progress_reports_at_most_every_interval_and_always_at_the_end(caplog):
    now = [100.0]
    tracker = JobProgress(
        logging.getLogger("koala_batch.test"), total=32, interval_s=5, clock=lambda: now[0]
    )
    with caplog.at_level(logging.INFO, logger="koala_batch.test"):
        tracker.set_generated(8, first_image_at=98.0)
        tracker.report()
        now[0] = 102.0
        tracker.add_commit(16, errors=1)
        tracker.report()  # within 5 s of the last: not logged
        tracker.add_commit(16, errors=0)
        tracker.report(final=True)
    events = [record for record in caplog.records if record.event == "progress"]
    assert [(e.done, e.generated, e.failed, e.final) for e in events] == [
        (0, 8, 0, False),
        (32, 32, 1, True),
    ]
    assert events[-1].images_per_s == pytest.approx(32 / 4.0)


def test_json_formatter_writes_one_object_with_the_extra_fields():
    record = logging.getLogger("koala_batch.runtime.job").makeRecord(
        "koala_batch.runtime.job",
        logging.WARNING,
        __file__,
        1,
        "committed shard %s: %d images",
        ("000-abc", 16),
        None,
        extra={"event": "shard_committed", "shard": "000-abc", "images": 16, "_private": 1},
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert datetime.fromisoformat(entry["ts"]).utcoffset() is not None
    assert entry["level"] == "warning" and entry["logger"] == "koala_batch.runtime.job"
    assert entry["message"] == "committed shard 000-abc: 16 images"
    assert (entry["event"], entry["shard"], entry["images"]) == ("shard_committed", "000-abc", 16)
    assert "_private" not in entry and "args" not in entry and "msg" not in entry


def test_json_formatter_keeps_a_traceback_in_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    assert len(line.splitlines()) == 1
    assert "ValueError: boom" in json.loads(line)["exception"]


def test_failure_line_is_one_line_in_text_and_a_json_error_record_in_json():
    message = "koala-batch: job failed: 9 of 64 images failed\n(see the manifests)"
    assert failure_line(message, 1, "text") == (
        "koala-batch: job failed: 9 of 64 images failed (see the manifests)"
    )
    entry = json.loads(failure_line(message, 1, "json"))
    assert entry["level"] == "error" and entry["exit_code"] == 1
    assert entry["message"].startswith("koala-batch: job failed: 9 of 64")
    assert datetime.fromisoformat(entry["ts"]).utcoffset() is not None


def test_auto_is_text_on_a_terminal_and_json_elsewhere():
    assert resolve_log_format("auto", FakeTerminal()) == "text"
    assert resolve_log_format("auto", io.StringIO()) == "json"
    assert resolve_log_format("text", io.StringIO()) == "text"
    with pytest.raises(ValueError, match="one of auto, text, json"):
        resolve_log_format("xml", io.StringIO())


def console_logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"koala_batch.test_console.{id(handler)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


def test_live_line_is_redrawn_in_place_and_cleared_before_other_lines():
    terminal = FakeTerminal()
    logger = console_logger(ConsoleHandler(terminal, "text", LiveLine(terminal)))
    clear = LiveLine.CLEAR

    logger.info("1/4 images", extra={"event": "progress"})
    logger.info("2/4 images", extra={"event": "progress"})
    logger.info("committed shard a: 2 images")
    logger.info("4/4 images", extra={"event": "progress", "final": True})

    segments = terminal.getvalue().split(clear)
    assert segments[:3] == ["", "1/4 images", "2/4 images"]
    # The log line starts on a cleared line and ends with its newline; the progress line
    # is drawn again after it, and the last one stays as an ordinary line.
    assert segments[3].endswith(" INFO " + logger.name + ": committed shard a: 2 images\n")
    assert segments[4:] == ["2/4 images", "4/4 images\n"]


def test_text_off_a_terminal_leaves_progress_events_out():
    stream = io.StringIO()
    logger = console_logger(ConsoleHandler(stream, "text"))
    logger.info("1/4 images", extra={"event": "progress"})
    logger.info("committed shard a: 2 images")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].endswith(
        "INFO " + logger.name + ": committed shard a: 2 images"
    )
    assert "\r" not in stream.getvalue()


def test_json_console_writes_every_record_as_a_json_line():
    stream = io.StringIO()
    logger = console_logger(ConsoleHandler(stream, "json"))
    logger.info("1/4 images", extra={"event": "progress", "done": 1, "total": 4})
    logger.warning("a warning")
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["level"], e["message"]) for e in entries] == [
        ("info", "1/4 images"),
        ("warning", "a warning"),
    ]
    assert (entries[0]["event"], entries[0]["done"], entries[0]["total"]) == ("progress", 1, 4)


def test_a_harness_that_configured_logging_keeps_printing(caplog):
    # pytest's handlers are on the root logger, as an application's would be.
    console = progress.configure_console("auto", stream=FakeTerminal())
    assert console.log_format == "text"
    assert console.handler is None and console.live is None
    assert not any(isinstance(h, ConsoleHandler) for h in logging.getLogger().handlers)


def test_print_failure_follows_the_console_format(caplog):
    progress.configure_console("json", stream=io.StringIO())
    stream = io.StringIO()
    progress.print_failure("koala-batch: error: no such spec", 2, stream)
    entry = json.loads(stream.getvalue())
    assert (entry["level"], entry["exit_code"]) == ("error", 2)


def test_cli_takes_log_format_before_or_after_the_command():
    parser = cli.build_parser()
    assert parser.parse_args(["validate", "s.yaml"]).log_format == "auto"
    assert parser.parse_args(["--log-format", "json", "validate", "s.yaml"]).log_format == "json"
    assert parser.parse_args(["run", "s.yaml", "--log-format", "text"]).log_format == "text"
    assert parser.parse_args(["verify", "out/", "--log-format", "json"]).log_format == "json"
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "s.yaml", "--log-format", "xml"])


def test_cli_final_error_is_one_json_line_in_json_mode(tmp_path, capsys):
    code = cli.main(["validate", str(tmp_path / "missing.yaml"), "--log-format", "json"])
    err = capsys.readouterr().err
    assert code == 2
    (line,) = err.splitlines()
    entry = json.loads(line)
    assert entry["level"] == "error" and entry["exit_code"] == 2
    assert (
        entry["message"] == f"koala-batch: error: job spec {tmp_path}/missing.yaml does not exist"
    )


def test_cli_unexpected_error_is_one_line_in_text_mode(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cli, "command_verify", broken)
    assert cli.main(["--log-format", "text", "verify", "out/"]) == 1
    assert capsys.readouterr().err == (
        "koala-batch: verify failed: RuntimeError: disk on fire (run with -v for the traceback)\n"
    )


def test_the_ray_data_note_pattern_matches_rays_line_only():
    assert RAY_DATA_ACTOR_ARGS_NOTE.search(RAY_NOTE)
    other = RAY_NOTE.replace(b"MapWorker(MapBatches(GenerateImages))", b"MyActor")
    assert not RAY_DATA_ACTOR_ARGS_NOTE.search(other)
    assert not RAY_DATA_ACTOR_ARGS_NOTE.search(b"core_worker.cc:99: Failed to connect to GCS\n")


def test_native_stderr_filter_drops_the_one_line_and_lets_the_rest_through(capfd):
    with progress.drop_native_stderr_line(RAY_DATA_ACTOR_ARGS_NOTE):
        os.write(2, b"[2026-11-28 00:57:47,500 E 1 1] core_worker.cc:10: a real error\n")
        os.write(2, RAY_NOTE[:40])  # native code may write a line in pieces
        os.write(2, RAY_NOTE[40:])
        os.write(2, b"from python\n")
        os.write(2, b"\rlive line without its newline")
    os.write(2, b"\nafter\n")
    err = capfd.readouterr().err
    assert "constructor arguments" not in err
    assert err == (
        "[2026-11-28 00:57:47,500 E 1 1] core_worker.cc:10: a real error\n"
        "from python\n\rlive line without its newline\nafter\n"
    )


def test_native_stderr_filter_drops_the_line_once_only(capfd):
    with progress.drop_native_stderr_line(RAY_DATA_ACTOR_ARGS_NOTE):
        os.write(2, RAY_NOTE)
        os.write(2, RAY_NOTE)
    assert capfd.readouterr().err == RAY_NOTE.decode()


def test_python_warnings_become_records_in_json_mode(caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        try:
            progress.configure_console("json", stream=io.StringIO())
            warnings.warn("an old api", FutureWarning, stacklevel=1)
        finally:
            logging.captureWarnings(False)
    (record,) = [r for r in caplog.records if r.name == "py.warnings"]
    assert "FutureWarning: an old api" in record.getMessage()


def test_a_library_console_handler_gives_way_to_the_json_console(monkeypatch):
    ours = io.StringIO()
    monkeypatch.setattr(
        progress, "_console", progress.Console("json", ours, None, ConsoleHandler(ours, "json"))
    )
    library = logging.getLogger("koala_batch_test_library")
    theirs = io.StringIO()
    library.addHandler(logging.StreamHandler(theirs))
    library.propagate = False
    try:
        progress.adopt_library_console(library.name)
        assert library.propagate
        library.handlers[0].handle(library.makeRecord(library.name, 30, "f", 1, "x", (), None))
        assert theirs.getvalue() == ""  # its own console handler prints nothing now
    finally:
        library.handlers.clear()
        library.propagate = True
    other = logging.getLogger("koala_batch_test_library_2")
    other.addHandler(logging.StreamHandler(theirs))
    try:
        progress.style_library_console(other.name)
        other.warning("kept apart")
        assert json.loads(theirs.getvalue())["message"] == "kept apart"
    finally:
        other.handlers.clear()
