"""SIGINT and SIGTERM during a job: real signals to this process, handled in the main thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from koala_batch import errors
from koala_batch.cli import main as cli
from koala_batch.runtime import signals
from koala_batch.runtime.signals import SignalStop, StopRequested, stop_on_signals


@pytest.fixture(autouse=True)
def keep_handlers():
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    # As under a terminal, whatever this process inherited: started in the background by a
    # shell without job control (`nohup make check &`), it has SIGINT ignored, and a stop
    # rightly leaves an ignored signal ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


def test_the_first_signal_stops_and_a_repeat_is_ignored():
    sigint_before = signal.getsignal(signal.SIGINT)
    with stop_on_signals() as stop:
        with pytest.raises(StopRequested):
            signal.raise_signal(signal.SIGTERM)
        # A second Ctrl-C while the job shuts its cluster down must not cut that short.
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        assert stop.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGINT) is sigint_before


def test_a_signal_while_held_waits_for_the_end_of_the_hold():
    with stop_on_signals() as stop:
        with pytest.raises(StopRequested), stop.held():
            signal.raise_signal(signal.SIGINT)
            finished_inside = True
        assert finished_inside and stop.received == signal.SIGINT


def test_an_enclosing_stop_is_reused_and_kept():
    with stop_on_signals() as outer:
        with stop_on_signals() as inner:
            assert inner is outer
        # The inner block leaves the enclosing handlers in place.
        with pytest.raises(StopRequested):
            signal.raise_signal(signal.SIGINT)
        assert outer.received == signal.SIGINT


def test_a_handler_left_behind_is_not_taken_for_an_enclosing_stop():
    # A stop whose block is over but whose handler stayed installed (spent by a signal):
    # reusing it, a new block would let every signal pass (seen in full test runs).
    left = SignalStop()
    left.install()
    with pytest.raises(StopRequested):
        signal.raise_signal(signal.SIGINT)
    with stop_on_signals() as stop:
        assert stop is not left
        with pytest.raises(StopRequested):
            signal.raise_signal(signal.SIGINT)


def test_a_signal_ignored_before_stays_ignored():
    # A job started in the background by a non-interactive shell has SIGINT ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with stop_on_signals() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.received is None
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_interrupted_exits_with_128_plus_the_signal():
    assert errors.Interrupted(signal.SIGINT, "stopped").exit_code == 130
    assert errors.Interrupted(signal.SIGTERM, "stopped").exit_code == 143
    assert errors.Interrupted.headline == "interrupted"
    assert issubclass(errors.ClusterResourcesError, errors.UsageError)


def test_cli_reports_a_ctrl_c_outside_a_run_in_one_line(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "command_verify", interrupted)
    code = cli.main(["--log-format", "text", "verify", "out/"])
    assert code == 130
    assert capsys.readouterr().err == "koala-batch: interrupted: verify stopped by SIGINT\n"


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_the_deadline_comes_that_long_after_the_first_signal():
    expired: list[int] = []
    stop = SignalStop(expired.append, deadline_s=0.3)
    stop.install()
    time.sleep(0.5)
    assert not expired  # no signal, no deadline
    with pytest.raises(StopRequested):
        signal.raise_signal(signal.SIGTERM)
    signalled = time.monotonic()
    signal.raise_signal(signal.SIGINT)  # a repeat does not move it
    assert wait_for(lambda: expired)
    assert expired == [signal.SIGTERM] and time.monotonic() - signalled >= 0.29
    assert 8.0 < stop.seconds_left(10.0) <= 9.71


def test_a_stop_whose_block_ends_has_no_deadline(monkeypatch):
    monkeypatch.setattr(signals, "STOP_DEADLINE_S", 0.2)
    expired: list[int] = []
    with stop_on_signals(expired.append) as stop, pytest.raises(StopRequested):
        signal.raise_signal(signal.SIGINT)
    assert stop.received == signal.SIGINT
    time.sleep(0.5)
    assert not expired
    with stop_on_signals(expired.append) as stop:
        with pytest.raises(StopRequested):
            signal.raise_signal(signal.SIGINT)
        assert wait_for(lambda: expired)  # the same, still in its block


def test_run_within_says_whether_the_call_ended_in_time():
    release = threading.Event()
    started = time.monotonic()
    assert signals.run_within(release.wait, 0.3) is False
    assert 0.29 <= time.monotonic() - started < 2.0
    release.set()
    assert signals.run_within(lambda: time.sleep(0.05), 5.0) is True
    assert signals.run_within(lambda: 1 / 0, 5.0) is True  # raised: ended all the same


# `koala-batch run` whose job never finishes stopping: after the signal it waits where no
# signal reaches it, as a Ray shutdown waiting on its cluster in native code does.
HUNG_RUN = """
import sys, threading
from koala_batch.cli import main as cli
from koala_batch.runtime import job, signals

signals.STOP_DEADLINE_S = 1.0

def hung_run(spec, retry_failed=False):
    try:
        print("running", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        threading.Event().wait()

job.run = hung_run
cli._load = lambda args: None
sys.argv = ["koala-batch", "--log-format", "text", "run", "job.yaml"]
cli.entry()
"""


def test_a_stop_that_hangs_ends_at_its_deadline_with_its_code_and_line():
    process = subprocess.Popen(
        [sys.executable, "-c", HUNG_RUN],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "running\n"
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert time.monotonic() - signalled < 10.0
    assert process.returncode == 143, stderr
    assert stderr == (
        "koala-batch: interrupted: stopped by SIGTERM, cut short after 1 s; every committed "
        "shard is kept: rerun the same command to resume\n"
    )
