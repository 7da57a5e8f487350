"""Failures as the user reads them: the root cause inside Ray's wrappers, in one line."""

from __future__ import annotations


def root_cause(exc: BaseException) -> BaseException:
    """The original exception inside Ray's wrappers (RayTaskError, UserCodeException)."""
    from ray.data.exceptions import SystemException

    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        # Ray Data raises the real error `from` an empty SystemException of its own: a
        # marker that the trace is internal, never a cause.
        if inner is None or isinstance(inner, SystemException):
            break
        exc = inner
    return exc


def describe_failure(exc: BaseException) -> str:
    """One readable line for a failed task: the root cause and the notes naming its target."""
    cause = root_cause(exc)
    notes = "; ".join(getattr(cause, "__notes__", []))
    text = f"{type(cause).__name__}: {cause}".strip()
    return f"{text} ({notes})" if notes else text


def stage_error(exc: BaseException) -> BaseException:
    """A stage's own error as it raised it. Ray Data appends its retry advice to the
    message of a failed task's exception, on lines of their own; koala-batch's messages
    are one line, and that advice is wrong for an error that is final."""
    if exc.args and isinstance(exc.args[0], str) and "\n" in exc.args[0]:
        exc.args = (exc.args[0].split("\n", 1)[0], *exc.args[1:])
    return exc
