"""The output lease: one live run per output, a dead one's lease taken over (no Ray)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time

import pytest

from koala_batch.errors import OutputBusyError
from koala_batch.output.commit import check_output, claim_output
from koala_batch.output.layout import FileKind, classify, is_claim_file, scan_output
from koala_batch.output.lease import (
    OutputLease,
    current_holder,
    lease_epochs,
    lease_path,
    read_holder,
)
from koala_batch.storage import Storage
from tests.unit.conftest import make_spec


@pytest.fixture
def storage(tmp_path):
    return Storage(str(tmp_path / "out"))


def write_lease(storage: Storage, epoch: int, *, host: str, pid: int, heartbeat_s: float):
    fields = {
        "run_id": "old-run",
        "host": host,
        "pid": pid,
        "started_at": "2026-11-27T02:00:00+00:00",
        "beat": 7,
        "heartbeat_s": heartbeat_s,
    }
    storage.write_bytes(lease_path(epoch), json.dumps(fields).encode())


def finished_pid() -> int:
    """The pid of a process of this machine that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_run_holds_the_lease_while_it_works_and_deletes_it_at_the_end(storage):
    assert current_holder(storage) is None
    with OutputLease(storage, "run-a", heartbeat_s=0.05) as lease:
        assert lease.epoch == 1
        first = current_holder(storage)
        assert first is not None and first.run_id == "run-a"
        time.sleep(0.3)
        later = read_holder(storage, 1)
        assert later is not None and later.beat > first.beat  # the heartbeat moves
    assert lease_epochs(storage) == []


def test_a_second_run_on_a_live_output_exits_busy_and_writes_nothing(storage):
    with OutputLease(storage, "run-a", heartbeat_s=0.1):
        with pytest.raises(OutputBusyError) as busy:
            OutputLease(storage, "run-b", heartbeat_s=0.1).acquire()
        assert "run run-a" in str(busy.value)
        assert "rerun this command to resume" in str(busy.value)
        holder = read_holder(storage, 1)
        assert lease_epochs(storage) == [1] and holder is not None and holder.run_id == "run-a"


def test_a_lease_whose_heartbeat_stopped_is_taken_over(storage, caplog):
    write_lease(storage, 1, host="another-machine", pid=1, heartbeat_s=0.1)
    caplog.set_level(logging.INFO, logger="koala_batch.output.lease")
    with OutputLease(storage, "run-b", heartbeat_s=0.1) as lease:
        assert lease.epoch == 2
        assert lease_epochs(storage) == [2]  # the dead run's file is gone
    assert "took the output over from run old-run" in caplog.text


def test_a_holder_on_this_machine_whose_process_is_gone_is_dead_at_once(storage):
    import socket

    # A watch of 2.5 x 600 s would outlast the test's timeout.
    write_lease(storage, 1, host=socket.gethostname(), pid=finished_pid(), heartbeat_s=600)
    started = time.monotonic()
    with OutputLease(storage, "run-b", heartbeat_s=0.1) as lease:
        assert lease.epoch == 2
    assert time.monotonic() - started < 60


def test_a_lease_released_while_watched_is_taken(storage):
    write_lease(storage, 1, host="another-machine", pid=1, heartbeat_s=5)
    threading.Timer(0.5, storage.remove, [lease_path(1)]).start()
    with OutputLease(storage, "run-b", heartbeat_s=0.1) as lease:
        assert lease.epoch == 2


def test_of_two_runs_taking_over_one_dead_lease_exactly_one_gets_it(storage):
    write_lease(storage, 1, host="another-machine", pid=1, heartbeat_s=0.1)
    start = threading.Barrier(2)
    outcomes: dict[str, object] = {}
    leases = {name: OutputLease(storage, name, heartbeat_s=0.1) for name in ("run-b", "run-c")}

    def take(name: str) -> None:
        start.wait()
        try:
            leases[name].acquire()
            outcomes[name] = "holds"
        except OutputBusyError as busy:
            outcomes[name] = busy

    threads = [threading.Thread(target=take, args=(name,)) for name in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert sorted(str(type(o).__name__) for o in outcomes.values()) == [
            "OutputBusyError",
            "str",
        ], outcomes
        holder = read_holder(storage, lease_epochs(storage)[-1])
        assert holder is not None and outcomes[holder.run_id] == "holds"
    finally:
        for lease in leases.values():
            lease.release()


def test_a_run_whose_lease_was_taken_stops_beating_and_leaves_the_new_one(storage, caplog):
    caplog.set_level(logging.WARNING, logger="koala_batch.output.lease")
    lease = OutputLease(storage, "run-a", heartbeat_s=0.05)
    lease.acquire()
    write_lease(storage, 2, host="another-machine", pid=1, heartbeat_s=0.05)
    time.sleep(0.3)
    lease.release()
    assert lease_epochs(storage) == [2]
    assert "another run took this output's lease over" in caplog.text


def test_lease_files_belong_to_koala_batch_but_an_overwrite_leaves_them():
    assert classify("_lease/000000000003.json") == (FileKind.LEASE, None)
    assert classify("_lease/notes.json")[0] is FileKind.FOREIGN
    listing = scan_output(["_job.json", "_lease/000000000003.json", "_SUCCESS"])
    assert listing.leases == ("_lease/000000000003.json",)
    assert listing.foreign == ()
    assert "_lease/000000000003.json" not in listing.own_files
    assert "_job.json" in listing.own_files


def test_a_lease_another_run_is_creating_leaves_a_new_output_new(storage, tmp_path):
    """Two runs started together on a new output: the one holding the lease checks the
    output while the other's lease is still written aside. Taken for a job's file, that
    aside once made the holder refuse the output and release the lease under the other's
    read (a CI failure)."""
    write_lease(storage, 1, host="here", pid=1, heartbeat_s=1.0)
    racing = f"{lease_path(1)}.{'ab' * 16}.partial"
    storage.fs.pipe_file(storage.path(racing), b"{}")

    spec = make_spec(tmp_path / "out")
    assert check_output(storage, spec).action == "new"
    assert claim_output(storage, spec) is False
    assert storage.read_bytes("_job.json")


@pytest.mark.parametrize(
    ("relative", "claims"),
    [
        ("_lease/000000000001.json", True),
        (f"_lease/000000000001.json.{'0f' * 16}.partial", True),
        (f"_job.json.{'0f' * 16}.partial", True),
        (f"_SUCCESS.{'0f' * 16}.partial", False),
        (f"manifests/{'0' * 8}.parquet.{'0f' * 16}.partial", False),
        ("_job.json", False),  # the job itself: no longer before any job
        ("_lease/notes.json", False),
    ],
)
def test_only_leases_and_asides_of_leases_and_the_job_file_come_before_a_job(relative, claims):
    assert is_claim_file(relative) is claims
