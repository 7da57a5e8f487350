"""Starting a local Ray cluster again when its node was slow to start (no cluster: the
start is a function that fails as Ray does)."""

from __future__ import annotations

import pytest

from koala_batch.compat import RAY_SLOW_NODE_START
from koala_batch.errors import JobFailedError
from koala_batch.runtime.session import LOCAL_START_TRIES, start_tolerating_slow_node


def failing_start(failures: list[Exception]):
    """A start that raises each of `failures` in turn, then succeeds; its calls counted."""
    calls: list[int] = []

    def start() -> None:
        calls.append(len(calls))
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]

    return start, calls


def slow() -> Exception:
    return Exception(f"{RAY_SLOW_NODE_START}. This could happen because some of the raylet")


def test_a_slow_start_is_tried_again_up_to_the_last_try():
    start, calls = failing_start([slow()] * (LOCAL_START_TRIES - 1))
    start_tolerating_slow_node(start)
    assert len(calls) == LOCAL_START_TRIES


def test_a_start_slow_every_time_ends_in_one_line_saying_what_to_do():
    start, calls = failing_start([slow()] * LOCAL_START_TRIES)
    with pytest.raises(JobFailedError) as failed:
        start_tolerating_slow_node(start)
    assert len(calls) == LOCAL_START_TRIES
    message = str(failed.value)
    assert "\n" not in message and message.startswith("the local Ray cluster did not start")
    assert "rerun once other work is done, or give Ray fewer CPUs" in message


def test_any_other_failure_is_not_tried_again():
    start, calls = failing_start([RuntimeError("Failed to start the GCS")])
    with pytest.raises(RuntimeError, match="Failed to start the GCS"):
        start_tolerating_slow_node(start)
    assert len(calls) == 1
