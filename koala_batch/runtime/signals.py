"""Stopping on SIGINT and SIGTERM: the stop, its deadline, and calls bounded in time."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


class StopRequested(KeyboardInterrupt):
    """Raised in the main thread by `SignalStop`: a KeyboardInterrupt, which Ray's waits
    (ray.get) pass on as they do a Ctrl-C, where they would swallow another exception."""


# A stop must end well within the 30 s that Kubernetes gives a pod between SIGTERM and
# SIGKILL (terminationGracePeriodSeconds), on a busy node too.
STOP_DEADLINE_S = 20.0


# What a stop gives `ray.shutdown()` of the local cluster the job started, from the first
# signal: it can wait on that cluster without end, in native code no signal reaches.
STOP_RAY_SHUTDOWN_S = 12.0


class SignalStop:
    """SIGINT and SIGTERM, turned into `StopRequested` in the main thread.

    Only the first signal raises, and only outside `held()`: a repeat (a second Ctrl-C)
    while the job stops is ignored, so that shutting the local cluster down completes; one
    that arrives within `held()` raises when the hold ends. A signal that was ignored when
    the stop was made (a job started in the background) stays ignored.

    With `on_deadline` (the CLI's, which ends the process), a thread calls it with the
    signal `deadline_s` (`STOP_DEADLINE_S`) after the first one if the stop's block has not
    ended by then, however stuck the main thread is.
    """

    def __init__(
        self,
        on_deadline: Callable[[int], None] | None = None,
        deadline_s: float | None = None,
    ) -> None:
        self.signals = [
            signum
            for signum in (signal.SIGINT, signal.SIGTERM)
            if signal.getsignal(signum) is not signal.SIG_IGN
        ]
        self.received: int | None = None
        # time.monotonic() at the first signal.
        self.since: float | None = None
        self._raised = False
        self._holds = 0
        # Within its `stop_on_signals` block: only then may an inner block reuse it.
        self.active = False
        self._signalled = threading.Event()
        self._ended = threading.Event()
        if on_deadline is not None:
            # Started now, not from the handler: a thread started there could wait for
            # threading's own lock, held by the main thread the handler interrupted.
            threading.Thread(
                target=self._watch,
                args=(on_deadline, STOP_DEADLINE_S if deadline_s is None else deadline_s),
                name="koala-batch-stop-deadline",
                daemon=True,
            ).start()

    def handle(self, signum: int, frame: object) -> None:
        """The signal handler."""
        if self.received is None:
            self.received = signum
            self.since = time.monotonic()
            self._signalled.set()
        if not self._raised and not self._holds:
            self._raised = True
            raise StopRequested(signum)

    def end(self) -> None:
        """The stop's block ended: no deadline any more."""
        self._ended.set()
        self._signalled.set()

    def seconds_left(self, within_s: float) -> float:
        """What is left (at least 1 s) of `within_s` seconds from the first signal."""
        if self.since is None:
            return within_s
        return max(1.0, self.since + within_s - time.monotonic())

    def _watch(self, on_deadline: Callable[[int], None], deadline_s: float) -> None:
        self._signalled.wait()
        if self.since is None or self._ended.wait(self.since + deadline_s - time.monotonic()):
            return
        assert self.received is not None
        on_deadline(self.received)

    def install(self) -> None:
        """Install the handler (again after ray.init, which puts in its own for SIGTERM: it
        kills the local cluster under the running job, which then aborts with a C++ stack
        dump)."""
        for signum in self.signals:
            signal.signal(signum, self.handle)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Signals wait for the end of the block."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
        if self.received is not None and not self._raised and not self._holds:
            self._raised = True
            raise StopRequested(self.received)


def _enclosing_stop() -> SignalStop | None:
    """The stop whose handlers are in place now, within its block (the CLI's), if any."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        owner = getattr(signal.getsignal(signum), "__self__", None)
        # A handler whose block has ended (left behind, spent) is no enclosing stop.
        if isinstance(owner, SignalStop) and owner.active:
            return owner
    return None


def _passive_stop() -> SignalStop:
    """A stop that handles no signal: a Ctrl-C still reaches the code as the
    KeyboardInterrupt of Python's own handler, if that is in place."""
    stop = SignalStop()
    stop.signals = []
    return stop


def current_stop() -> SignalStop:
    """The stop a library call goes by without touching any handler: the CLI's, if its
    `stop_on_signals` block is in place, else a passive one."""
    return _enclosing_stop() or _passive_stop()


@contextmanager
def stop_on_signals(on_deadline: Callable[[int], None] | None = None) -> Iterator[SignalStop]:
    """Within the block SIGINT and SIGTERM raise `StopRequested` (see `SignalStop`, also
    for `on_deadline`); the handlers in place before are restored after it. Reuses an
    enclosing block's stop; outside the main thread, where Python cannot handle signals,
    it does nothing. The CLI's: a library call never installs one."""
    enclosing = _enclosing_stop()
    if enclosing is not None:
        yield enclosing
        return
    if threading.current_thread() is not threading.main_thread():
        yield _passive_stop()
        return
    stop = SignalStop(on_deadline)
    with kept_signal_handlers():
        stop.install()
        stop.active = True
        try:
            yield stop
        finally:
            stop.active = False
            stop.end()


@contextmanager
def kept_signal_handlers() -> Iterator[None]:
    """SIGINT's and SIGTERM's handlers put back after the block as they were before it:
    around a call that puts in its own (ray.init, for SIGTERM). In the main thread only,
    the one where handlers can be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # None: a handler not set from Python, which Python cannot put back as it was.
            if signal.getsignal(signum) is not handler:
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def run_within(call: Callable[[], object], timeout_s: float) -> bool:
    """`call()` in a thread of its own, waited for at most `timeout_s`: whether it returned
    (or raised, logged) by then. Past that it is left to finish, or not."""
    done = threading.Event()

    def target() -> None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - the caller's thread has no use for it
            logger.debug("%r failed: %s: %s", call, type(exc).__name__, exc)
        finally:
            done.set()

    threading.Thread(target=target, name="koala-batch-bounded-call", daemon=True).start()
    return done.wait(timeout_s)
