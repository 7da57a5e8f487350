"""The console: log records as text lines or JSON objects, and the job's progress.

`configure_console` is called once by the CLI. In text mode a terminal gets one live
progress line, redrawn in place and cleared before any other line is printed; elsewhere
the commit lines say how far the job is. In JSON mode every record is one JSON object
per line (for schedulers and log collectors), progress events included.

The job reports its progress through `JobProgress`, which logs `event="progress"` records
at most every few seconds and once at the end; the console decides where they go. Library
use without `configure_console` gets them as ordinary INFO records.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from koala_batch.compat import ray_data_console_handlers

LOG_FORMATS = ("auto", "text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PROGRESS_EVENT = "progress"
# How often a progress event is logged at most: JSON lines are kept for good, a live line
# is only redrawn (at each commit and each poll of the generators).
JSON_PROGRESS_INTERVAL_S = 5.0
LIVE_PROGRESS_INTERVAL_S = 0.0

# The attributes every LogRecord has: anything else on a record came in through `extra`.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", (), None).__dict__
) | {"message", "asctime", "taskName"}


def is_terminal(stream: Any) -> bool:
    """Whether `stream` is an interactive terminal (a closed or odd stream is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def resolve_log_format(requested: str, stream: Any) -> str:
    """`text` or `json`: auto is text on a terminal, JSON for anything else."""
    if requested not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {requested!r}")
    if requested != "auto":
        return requested
    return "text" if is_terminal(stream) else "json"


def format_duration(seconds: float | None) -> str:
    """A duration for people: 42s, 3m05s, 2h07m; ? when unknown."""
    if seconds is None:
        return "?"
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


@dataclass(frozen=True)
class ProgressSnapshot:
    """Where a job stands: `done` images committed of `total` (earlier runs included),
    `generated` made this run (committed or not), `failed` error rows committed."""

    done: int
    total: int
    generated: int
    failed: int
    images_per_s: float | None
    eta_s: float | None

    def fields(self) -> dict[str, Any]:
        """The structured fields of a progress event."""
        return {
            "event": PROGRESS_EVENT,
            "done": self.done,
            "total": self.total,
            "generated": self.generated,
            "failed": self.failed,
            "images_per_s": None if self.images_per_s is None else round(self.images_per_s, 3),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
        }

    def text(self) -> str:
        """One line: images done/total, images/s, ETA, failures."""
        percent = 100 * self.done // self.total if self.total else 100
        rate = "?" if self.images_per_s is None else f"{self.images_per_s:.2f}"
        return (
            f"{self.done}/{self.total} images ({percent}%) | {self.generated} generated | "
            f"{rate} images/s | ETA {format_duration(self.eta_s)} | {self.failed} failed"
        )


def progress_snapshot(
    *,
    total: int,
    committed_before: int,
    committed: int,
    generated: int,
    failed: int,
    first_image_at: float | None,
    now: float,
) -> ProgressSnapshot:
    """The progress of a run: `committed` and `generated` count this run's images; the rate
    is this run's images since its first one, the ETA the images still to make at it."""
    made = max(generated, committed)
    rate = None
    if first_image_at is not None and made > 0 and now > first_image_at:
        rate = made / (now - first_image_at)
    left = max(0, total - committed_before - made)
    eta = 0.0 if left == 0 else (left / rate if rate else None)
    return ProgressSnapshot(
        done=committed_before + committed,
        total=total,
        generated=made,
        failed=failed,
        images_per_s=rate,
        eta_s=eta,
    )


class JobProgress:
    """A run's progress, fed by the driver loop (commits) and a poller (generated images);
    `report` logs it as a progress event. Thread-safe."""

    def __init__(
        self,
        logger: logging.Logger,
        total: int,
        committed_before: int = 0,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.logger = logger
        self.total = total
        self.committed_before = committed_before
        self.interval_s = progress_interval() if interval_s is None else interval_s
        self.clock = clock
        self.committed = 0
        self.failed = 0
        self.generated = 0
        self.first_image_at: float | None = None
        self._reported_at: float | None = None
        self._lock = threading.Lock()

    def add_commit(self, images: int, errors: int) -> None:
        """A shard of `images` rows, `errors` of them error rows, is committed."""
        with self._lock:
            self.committed += images
            self.failed += errors
            if self.first_image_at is None:
                self.first_image_at = self.clock()

    def set_generated(self, images: int, first_image_at: float | None) -> None:
        """The generators have made `images` images, the first at `first_image_at`."""
        with self._lock:
            self.generated = max(self.generated, images)
            if first_image_at is not None and (
                self.first_image_at is None or first_image_at < self.first_image_at
            ):
                self.first_image_at = first_image_at

    def snapshot(self) -> ProgressSnapshot:
        """The progress now."""
        with self._lock:
            return progress_snapshot(
                total=self.total,
                committed_before=self.committed_before,
                committed=self.committed,
                generated=self.generated,
                failed=self.failed,
                first_image_at=self.first_image_at,
                now=self.clock(),
            )

    def report(self, final: bool = False) -> None:
        """Log a progress event, unless one was logged less than `interval_s` ago."""
        now = self.clock()
        with self._lock:
            if (
                not final
                and self._reported_at is not None
                and now - self._reported_at < self.interval_s
            ):
                return
            self._reported_at = now
        snapshot = self.snapshot()
        self.logger.info(snapshot.text(), extra={**snapshot.fields(), "final": final})


class Poller:
    """Calls `poll` every `period_s` seconds in a daemon thread until `stop`. An exception
    in `poll` is logged at debug level and polling goes on: progress is a report about the
    job, never the job."""

    def __init__(self, poll: Callable[[], None], period_s: float, logger: logging.Logger):
        self._poll = poll
        self._period_s = period_s
        self._logger = logger
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="koala-batch-progress", daemon=True)

    def start(self) -> Poller:
        """Start polling; returns self."""
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopped.wait(self._period_s):
            try:
                self._poll()
            except Exception as exc:  # noqa: BLE001 - see the class docstring
                self._logger.debug("progress poll failed: %s: %s", type(exc).__name__, exc)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop polling and wait (at most `timeout_s`) for a poll under way."""
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object: ts (ISO-8601, UTC), level, logger, message, and
    every field the record got through `extra`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_") and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str, ensure_ascii=False)


class LiveLine:
    """One line on a terminal, redrawn in place; cleared before other output."""

    CLEAR = "\r\x1b[K"

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.text: str | None = None
        self.width = terminal_width(stream)

    def show(self, text: str) -> None:
        """Draw `text` in place of the line shown."""
        self.text = text
        self._draw()

    def _draw(self) -> None:
        if self.text is None:
            return
        # Kept from the last time the stream said (it may go through a pipe for a while).
        self.width = terminal_width(self.stream, self.width)
        self.stream.write(self.CLEAR + self.text[: max(1, self.width - 1)])
        self.stream.flush()

    def hide(self) -> None:
        """Clear the line (it stays known, to `restore` after other output)."""
        if self.text is not None:
            self.stream.write(self.CLEAR)
            self.stream.flush()

    def restore(self) -> None:
        """Draw the line again after other output."""
        self._draw()

    def settle(self) -> None:
        """Leave the line as it is, as an ordinary line, and stop redrawing it."""
        if self.text is not None:
            self.stream.write("\n")
            self.stream.flush()
            self.text = None


def terminal_width(stream: Any, default: int = 80) -> int:
    """The terminal's width in columns (`default` if it does not say)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or default
    except (AttributeError, ValueError, OSError):
        return default


class ConsoleHandler(logging.StreamHandler):
    """Log records to the console.

    Progress events go to the live line (text on a terminal), nowhere (text elsewhere:
    the commit lines say the same), or out as any record (JSON); the live line is cleared
    before any other record and drawn again after it, so lines never interleave.
    """

    def __init__(self, stream: TextIO, log_format: str, live: LiveLine | None = None):
        super().__init__(stream)
        self.log_format = log_format
        self.live = live
        self.setFormatter(
            JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
        )

    def emit(self, record: logging.LogRecord) -> None:
        if self.log_format == "text" and getattr(record, "event", None) == PROGRESS_EVENT:
            if self.live is not None:
                try:
                    self.live.show(record.getMessage())
                    if getattr(record, "final", False):
                        self.live.settle()
                except Exception:  # noqa: BLE001 - as logging.Handler.emit does
                    self.handleError(record)
            return
        if self.live is not None:
            self.live.hide()
        super().emit(record)
        if self.live is not None:
            self.live.restore()


@dataclass
class Console:
    """How this process prints its log: `text` or `json`, and the live line if any."""

    log_format: str
    stream: TextIO
    live: LiveLine | None = None
    handler: ConsoleHandler | None = None


_console: Console | None = None


def console() -> Console | None:
    """The console `configure_console` set up; None in library use."""
    return _console


def progress_interval() -> float:
    """The least time between two progress events on this console."""
    if _console is not None and _console.live is not None:
        return LIVE_PROGRESS_INTERVAL_S
    return JSON_PROGRESS_INTERVAL_S


def configure_console(
    log_format: str, level: int = logging.INFO, stream: TextIO | None = None
) -> Console:
    """Set up the root logger's console output in `log_format` (auto, text or json).

    Replaces the handler an earlier call installed. If the root logger already has other
    handlers (an application or a test harness configured logging), they are left to do
    the printing, as `logging.basicConfig` would; the format still applies to the final
    failure line and to Ray's own console lines.
    """
    global _console
    stream = stream or sys.stderr
    resolved = resolve_log_format(log_format, stream)
    root = logging.getLogger()
    if _console is not None and _console.handler is not None:
        root.removeHandler(_console.handler)
    live = LiveLine(stream) if resolved == "text" and is_terminal(stream) else None
    handler = None
    if not root.handlers:
        handler = ConsoleHandler(stream, resolved, live)
        root.addHandler(handler)
        root.setLevel(level)
    # Python's warnings (a library's FutureWarning) as records: JSON like the rest.
    logging.captureWarnings(resolved == "json")
    _console = Console(resolved, stream, live if handler else None, handler)
    return _console


def _drop_all(record: logging.LogRecord) -> bool:
    return False


def adopt_library_console(name: str) -> None:
    """Print what logger `name` (a library logging with a console handler of its own, that
    does not propagate: Ray's) prints through this console instead, in its format: a JSON
    log stays all JSON, and the live line is cleared before the library's lines too."""
    if _console is None or _console.handler is None:
        return
    if _console.log_format == "text" and _console.live is None:
        return  # text lines as the library prints them
    library = logging.getLogger(name)
    for handler in library.handlers:
        if (
            isinstance(handler, logging.StreamHandler)
            and not isinstance(handler, logging.FileHandler)
            and _drop_all not in handler.filters
        ):
            handler.addFilter(_drop_all)
    library.propagate = True


def style_library_console(name: str) -> None:
    """Give the console handlers of logger `name` this console's JSON format (for a
    library logger whose records must not all propagate: Ray Data's plan lines)."""
    if _console is None or _console.log_format != "json":
        return
    for handler in logging.getLogger(name).handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.setFormatter(JsonFormatter())


def failure_line(message: str, exit_code: int, log_format: str) -> str:
    """The last line of a failed command: `message` itself in text mode (always one line),
    a JSON error record with its exit code in JSON mode."""
    message = " ".join(message.splitlines())
    if log_format != "json":
        return message
    return json.dumps(
        {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "level": "error",
            "logger": "koala_batch.cli.main",
            "message": message,
            "event": "failed",
            "exit_code": exit_code,
        },
        ensure_ascii=False,
    )


def print_failure(message: str, exit_code: int, stream: TextIO | None = None) -> None:
    """Print the final failure line in the console's format, clearing the live line."""
    stream = stream or sys.stderr
    current = _console
    log_format = current.log_format if current is not None else "text"
    if current is not None and current.live is not None:
        current.live.hide()
        current.live.text = None
    print(failure_line(message, exit_code, log_format), file=stream, flush=True)


def write_last_line(message: str, exit_code: int) -> None:
    """`print_failure` for a process about to end from another thread than the main one (a
    stop's deadline): one os.write to the real stderr, past sys.stderr's lock (which a main
    thread stuck in a write may hold) and past `drop_native_stderr_line`'s pipe (its thread
    would not pass the line on in time)."""
    current = _console
    log_format = current.log_format if current is not None else "text"
    clear = LiveLine.CLEAR if current is not None and current.live is not None else ""
    line = clear + failure_line(message, exit_code, log_format) + "\n"
    with suppress(OSError):  # no stderr left to say it on
        _write_all(_real_stderr_fd if _real_stderr_fd is not None else 2, line.encode())


# ---------------------------------------------------------------------------------------
# Lines written straight to the process's stderr (fd 2) by native code.

# The process's real stderr while `drop_native_stderr_line` pipes fd 2.
_real_stderr_fd: int | None = None


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def _forward(read_fd: int, saved: int, drop: re.Pattern[bytes]) -> None:
    """Copy the pipe to `saved` (the real stderr) line by line, leaving out the first line
    matching `drop`; then put `saved` back as fd 2 (the line is said once per process) and
    drain the pipe."""
    pending = b""
    dropped = False
    while True:
        # A partial line that may be a native log line waits for its end, at most briefly.
        ready, _, _ = select.select([read_fd], [], [], 0.2 if pending else None)
        chunk = os.read(read_fd, 65536) if ready else b""
        if ready and not chunk:
            if pending:
                _write_all(saved, pending)
            return
        data = pending + chunk
        lines = data.split(b"\n")
        pending = lines.pop()
        out = []
        for line in lines:
            if not dropped and drop.search(line):
                dropped = True
                os.dup2(saved, 2)
                continue
            out.append(line + b"\n")
        if pending and (not ready or not pending.lstrip(b"\r").startswith((b"[", b"\x1b"))):
            out.append(pending)
            pending = b""
        if out:
            _write_all(saved, b"".join(out))


@contextmanager
def drop_native_stderr_line(pattern: re.Pattern[bytes]) -> Iterator[None]:
    """Within the block, leave out of fd 2 the first line that matches `pattern` and let
    everything else through unchanged.

    For a line native code writes straight to fd 2, once per process, that no logging
    setting reaches. fd 2 goes through a pipe only until that line has passed (or the
    block ends), so the window in which a crash could lose output is short.
    """
    if sys.stderr is not None:
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (a daemon): nothing to filter
        yield
        return
    global _real_stderr_fd
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    thread = threading.Thread(
        target=_forward, args=(read_fd, saved, pattern), name="stderr-filter", daemon=True
    )
    thread.start()
    _real_stderr_fd = saved
    try:
        yield
    finally:
        if sys.stderr is not None:
            sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the thread drains it and ends
        _real_stderr_fd = None
        thread.join(5.0)
        if not thread.is_alive():  # else a child process holds the pipe: leave it be
            os.close(read_fd)
            os.close(saved)


# Ray's core worker says this, once per process, for every Ray Data actor pool: Ray Data
# puts an operator's UDF and context in the object store and hands the actors references,
# and gives them max_restarts=-1 (ray-project/ray#57733). Nothing koala-batch passes can
# avoid it short of actors that never restart. Ray Data keeps the references for the
# whole job, so what the note warns of cannot happen while the job runs. It also stays in
# the driver's log in the Ray session folder (python-core-driver-*.log).
RAY_DATA_ACTOR_ARGS_NOTE = re.compile(
    rb"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*has constructor arguments "
    rb"in the object store and max_restarts > 0"
)


def quiet_ray_data_console() -> None:
    """Ray Data's own lines (its execution plan, "Progress bars disabled") to its log file
    in the session folder only: on the console, a user reads koala-batch's lines about the
    job. Its errors too: each reaches the driver as the exception that koala-batch words
    as the run's last line, and Ray Data's own "Full stack trace" lines before it would
    only bury that line. They stay in ray-data.log in the session folder."""
    for handler in ray_data_console_handlers():
        handler.setLevel(logging.CRITICAL)
    style_library_console("ray.data")


@contextmanager
def quiet_ray_console() -> Iterator[None]:
    """Within the block, the CLI's console carries Ray's lines as its own, keeps Ray Data's
    plan lines in their log file, and leaves out Ray's one native note on actor arguments
    (`RAY_DATA_ACTOR_ARGS_NOTE`). Where the CLI has not set up the console (a library
    call), nothing is changed: not Ray's loggers, not file descriptor 2."""
    if _console is None:
        yield
        return
    adopt_library_console("ray")
    quiet_ray_data_console()
    with drop_native_stderr_line(RAY_DATA_ACTOR_ARGS_NOTE):
        yield
