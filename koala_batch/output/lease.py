"""One run at a time on an output: a lease kept alive by heartbeats.

A run holds the output's lease while it works on it: a file `_lease/{epoch}.json` that it
rewrites every `output.heartbeat_s` seconds with a higher beat count, and deletes when it
ends, however it ends short of SIGKILL. A second run that finds a lease watches it: a
lease whose beat moves within 2.5 heartbeats belongs to a live run, and the second run
exits with `OutputBusyError` before writing anything; a lease that does not move was left
by a run that died (a killed driver, a lost node), and the second run takes the output
over by creating the next epoch's file. A holder on this very machine whose process is
gone is known dead at once, without watching.

No clock is compared between machines: only whether the beat moves. Epoch files are
created with `Storage.create_exclusive` (a conditional PUT on S3), so of two runs taking
over one dead lease exactly one gets the next epoch. The lease keeps runs from overlapping;
it does not make a run's writes safe on its own. A run paused past the watch (a stalled
driver) may still find its lease taken: the run id in `_job.json` then stops its writers
before they commit (`commit.check_owner`), as it always has.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from koala_batch.errors import OutputBusyError
from koala_batch.output.layout import LEASE_DIR
from koala_batch.storage import Storage

logger = logging.getLogger(__name__)

# Heartbeats a watcher waits for before it calls a lease dead: one missed beat (a slow
# PUT, a loaded driver) is not death.
WATCH_HEARTBEATS = 2.5
_EPOCH_FILE = re.compile(r"(\d{12})\.json")


def lease_path(epoch: int) -> str:
    """Where the lease of one epoch lives, relative to the output prefix."""
    return f"{LEASE_DIR}/{epoch:012d}.json"


@dataclass(frozen=True)
class LeaseHolder:
    """What a lease file says about the run holding it."""

    epoch: int
    run_id: str
    host: str
    pid: int
    started_at: str
    beat: int
    heartbeat_s: float

    def describe(self) -> str:
        return f"run {self.run_id} (pid {self.pid} on {self.host}, started {self.started_at})"


def read_holder(storage: Storage, epoch: int) -> LeaseHolder | None:
    """The lease of one epoch, or None when it is gone (released) or unreadable (a write
    cut short by a dying holder reads as no lease)."""
    try:
        fields = json.loads(storage.read_bytes(lease_path(epoch)))
        return LeaseHolder(
            epoch=epoch,
            run_id=str(fields["run_id"]),
            host=str(fields["host"]),
            pid=int(fields["pid"]),
            started_at=str(fields["started_at"]),
            beat=int(fields["beat"]),
            heartbeat_s=float(fields["heartbeat_s"]),
        )
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        logger.debug("lease %s is unreadable", storage.url(lease_path(epoch)))
        return None


def lease_epochs(storage: Storage) -> list[int]:
    """The epochs with a lease file, ascending."""
    return sorted(
        int(match.group(1))
        for name in storage.list_files(LEASE_DIR)
        if (match := _EPOCH_FILE.fullmatch(name))
    )


def current_holder(storage: Storage) -> LeaseHolder | None:
    """The run holding the output's lease now, as its file says (alive or not), or None."""
    epochs = lease_epochs(storage)
    return read_holder(storage, epochs[-1]) if epochs else None


def _process_gone(holder: LeaseHolder) -> bool:
    """Whether the holder ran on this machine and its process no longer exists."""
    if holder.host != socket.gethostname():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # a process of another user: alive
        return False
    return False


class OutputLease:
    """The lease of one output for one run: `acquire`, heartbeats on a thread, `release`.

    Use as a context manager around everything the run does to the output.
    """

    def __init__(self, storage: Storage, run_id: str, heartbeat_s: float):
        self.storage = storage
        self.run_id = run_id
        self.heartbeat_s = heartbeat_s
        self.epoch: int | None = None
        self._beat = 0
        self._started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> OutputLease:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def _contents(self) -> bytes:
        fields: dict[str, Any] = {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self._started_at,
            "beat": self._beat,
            "heartbeat_s": self.heartbeat_s,
        }
        return json.dumps(fields).encode()

    def acquire(self) -> None:
        """Take the lease, or raise OutputBusyError naming the live run holding it."""
        for _ in range(5):
            epochs = lease_epochs(self.storage)
            if not epochs:
                if self._create(1, previous=[]):
                    return
                continue
            holder = read_holder(self.storage, epochs[-1])
            if holder is not None and not self._dead(holder):
                raise self._busy(holder)
            if self._create(epochs[-1] + 1, previous=epochs):
                if holder is not None:
                    logger.warning(
                        "took the output over from %s: its heartbeat stopped (it died or "
                        "lost its connection to %s)",
                        holder.describe(),
                        self.storage.url(""),
                    )
                return
        # Lost the race for each new epoch to other runs, one of which now holds it.
        holder = read_holder(self.storage, lease_epochs(self.storage)[-1])
        raise self._busy(holder)

    def _create(self, epoch: int, previous: list[int]) -> bool:
        if not self.storage.create_exclusive(lease_path(epoch), self._contents()):
            return False
        self.epoch = epoch
        for old in previous:  # dead holders' files: nobody reads them any more
            self.storage.remove(lease_path(old))
        self._thread = threading.Thread(
            target=self._heartbeats, name="koala-batch-lease", daemon=True
        )
        self._thread.start()
        return True

    def _dead(self, holder: LeaseHolder) -> bool:
        """Whether the holder has stopped: gone from this machine, or its beat does not
        move while watched (its file vanishing means it ended: not dead, but not busy)."""
        if _process_gone(holder):
            logger.info("the output's last run (%s) is no longer running", holder.describe())
            return True
        watch_s = WATCH_HEARTBEATS * holder.heartbeat_s
        logger.info(
            "%s holds the output's lease; watching its heartbeat for %.0f s to see whether "
            "it is still running",
            holder.describe(),
            watch_s,
        )
        deadline = time.monotonic() + watch_s
        while time.monotonic() < deadline:
            time.sleep(min(holder.heartbeat_s / 2, max(0.0, deadline - time.monotonic())))
            now = read_holder(self.storage, holder.epoch)
            if now is None:
                return True  # released: the next `acquire` round takes a new epoch
            if now.beat != holder.beat:
                return False
        return True

    def _busy(self, holder: LeaseHolder | None) -> OutputBusyError:
        who = holder.describe() if holder is not None else "another run"
        return OutputBusyError(
            f"output {self.storage.url('')} is being written by {who}, which is alive (its "
            "lease heartbeat moves); nothing was written. Let it finish (or stop it), then "
            "rerun this command to resume"
        )

    def _heartbeats(self) -> None:
        assert self.epoch is not None
        path = lease_path(self.epoch)
        while not self._stop.wait(self.heartbeat_s):
            epochs = lease_epochs(self.storage)
            if epochs and epochs[-1] > self.epoch:
                logger.warning(
                    "another run took this output's lease over (this run's heartbeat was "
                    "late); this run's writers stop at their next commit"
                )
                return
            self._beat += 1
            try:
                self.storage.write_bytes(path, self._contents())
            except Exception as exc:  # noqa: BLE001 - a heartbeat must never end the run
                # The next beat tries again; a watcher waits 2.5 beats before it gives up.
                logger.debug("lease heartbeat failed: %s", exc)

    def release(self) -> None:
        """Stop the heartbeats and delete this run's lease file (if it is still there)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.epoch is not None:
            holder = read_holder(self.storage, self.epoch)
            if holder is None or holder.run_id == self.run_id:
                self.storage.remove(lease_path(self.epoch))
            self.epoch = None
