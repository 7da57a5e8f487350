"""The errors koala-batch raises on purpose, each carrying the exit code the CLI returns.

Two families: a `UsageError` means the user must change something (the spec, the input,
the output prefix, the model) before a rerun can succeed, exit 2; any other
`KoalaBatchError` means the job ran and did not succeed, exit 1. The CLI maps every
exception through `exit_code` and `headline`, and nothing else.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2


class KoalaBatchError(Exception):
    """Base of koala-batch's own errors; the message is one line meant for the user."""

    exit_code = EXIT_FAILED
    headline: str | None = None  # the CLI prefix; None: "<command> failed"


class UsageError(KoalaBatchError):
    """Something the user gave cannot be used as it is; nothing was generated."""

    exit_code = EXIT_INVALID
    headline = "error"


class SpecError(UsageError, ValueError):
    """The job spec is invalid; the message names the field (and the file)."""


class InputError(UsageError, ValueError):
    """The input cannot be used; the message names the file and column."""


class OutputConflictError(UsageError):
    """The output prefix holds something this job must not touch or resume."""


class OutputUnwritableError(UsageError):
    """The output prefix cannot be written (no such bucket, a file in the way, no
    permission); the message names the output URL."""


class UnsafeWeightsError(UsageError, ValueError):
    """The model directory holds pickle weights only; they are never loaded."""


class ModelUnavailableError(UsageError):
    """model.name cannot be loaded from here (no such directory, not in the Hugging Face
    cache and the Hub unreachable, no weights manifest at an object-storage prefix); the
    message names the model and the fix. Nothing was generated."""


class ClusterResourcesError(UsageError):
    """The Ray cluster can never hold the generator actors the spec asks for (compute.*);
    the message says what the cluster has. Nothing was generated."""


class JobFailedError(KoalaBatchError):
    """The job ran but its result is not acceptable (too many failed images, say)."""

    headline = "job failed"


class GeneratorStartError(JobFailedError):
    """A generator actor could not be constructed (the model would not load, the GPU had
    no memory left, a driver mismatch); the message is the constructor's own error."""


class Interrupted(KoalaBatchError):
    """SIGINT or SIGTERM stopped the job; what it committed is kept. Exit 128 + the signal
    number (130, 143), as a shell reports a process ended by that signal."""

    headline = "interrupted"

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StorageError(KoalaBatchError, OSError):
    """A storage operation was refused for good (a path escaping the output prefix)."""


class OutputBusyError(KoalaBatchError):
    """Another run, alive, holds the output's lease (`lease.py`); nothing was written.
    A rerun once that run has finished resumes the output."""

    headline = "output busy"


class SecretInSubmissionError(UsageError):
    """`submit`: the spec holds storage credentials, which a submission would show on the
    Ray dashboard; the message names each field and where credentials go instead."""


class DashboardError(KoalaBatchError):
    """`submit`: the Ray dashboard at --address cannot be reached or refused the request."""


class RunSupersededError(KoalaBatchError):
    """Another run claimed the output: a writer of the old run must not commit."""


class StageInputError(KoalaBatchError):
    """A pipeline stage was handed a table without the columns it needs (a bug, not bad
    input: the message names the stage and the missing columns)."""
