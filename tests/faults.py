"""A fault-injecting fsspec filesystem for tests: transient and permanent storage faults.

`FaultyFileSystem` wraps a real filesystem (s3fs, local) and delegates every call the
job makes. Before delegating it may raise:

- a transient fault (`ConnectionError`, which koala_batch retries) on each of the first
  `transient_reads` read operations and the first `transient_writes` write operations;
- a permanent fault (`PermissionError`, never retried) on every write whose path
  contains `permanent_writes`.

The counts are shared by every copy of the filesystem, across processes: the job
pickles it to Ray workers, so the budget and a log of every operation live in files
under `state_dir`, updated under an `fcntl.flock`. A wrapper travels by pickle as its
inner filesystem (which must pickle: s3fs and LocalFileSystem do), the state directory
and its options.

Only whole operations fault (opening a file, not reading from an open handle): that is
the unit koala_batch retries.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fsspec.spec import AbstractFileSystem, make_instance

READ = "read"
WRITE = "write"
SCOPES = ("anywhere", "workers", "driver")


class InjectedTransientFault(ConnectionError):
    """The fault a flaky network gives: the request did not go through."""


class FaultyFileSystem(AbstractFileSystem):
    """Delegates to `inner`, injecting faults as configured; see the module docstring.

    scope: where transient faults may fire: "anywhere", "workers" (any process but the
    one that built the wrapper, i.e. Ray workers) or "driver".
    transient_paths: a regex; when set, only operations on matching paths use up the
    transient budget.
    """

    cachable = False  # every wrapper is its own instance: no fsspec instance cache

    def __init__(
        self,
        inner: AbstractFileSystem,
        state_dir: str | os.PathLike,
        *,
        transient_reads: int = 0,
        transient_writes: int = 0,
        permanent_writes: str | None = None,
        transient_paths: str | None = None,
        scope: str = "anywhere",
        owner_pid: int | None = None,
    ):
        super().__init__()
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
        self.inner = inner
        self.state_dir = str(state_dir)
        self.options = {
            "transient_reads": transient_reads,
            "transient_writes": transient_writes,
            "permanent_writes": permanent_writes,
            "transient_paths": transient_paths,
            "scope": scope,
            "owner_pid": owner_pid if owner_pid is not None else os.getpid(),
        }
        self.protocol = inner.protocol
        self.root_marker = inner.root_marker
        Path(self.state_dir).mkdir(parents=True, exist_ok=True)
        with self._locked():
            if not self._state_file.exists():
                self._state_file.write_text(json.dumps({READ: 0, WRITE: 0}))

    def __reduce__(self):
        # The resolved options (owner pid included), not the constructor's arguments.
        return make_instance, (type(self), (self.inner, self.state_dir), dict(self.options))

    def __repr__(self) -> str:
        return f"FaultyFileSystem({self.inner!r}, {self.state_dir!r}, {self.options})"

    # fault bookkeeping -----------------------------------------------------------

    @property
    def _state_file(self) -> Path:
        return Path(self.state_dir) / "state.json"

    @property
    def _log_file(self) -> Path:
        return Path(self.state_dir) / "operations.jsonl"

    @contextmanager
    def _locked(self):
        with open(Path(self.state_dir) / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _in_scope(self) -> bool:
        scope = self.options["scope"]
        if scope == "anywhere":
            return True
        in_owner = os.getpid() == self.options["owner_pid"]
        return in_owner if scope == "driver" else not in_owner

    def _check(self, kind: str, operation: str, *paths: Any) -> None:
        """Record one operation; raise the fault it is due, if any."""
        names = [str(p) for p in paths]
        fault = None
        pattern = self.options["permanent_writes"]
        if kind == WRITE and pattern and any(pattern in name for name in names):
            fault = "permanent"
        with self._locked():
            state = json.loads(self._state_file.read_text())
            if fault is None and self._in_scope():
                budget = self.options[f"transient_{kind}s"]
                only = self.options["transient_paths"]
                if state[kind] < budget and (not only or any(re.search(only, n) for n in names)):
                    state[kind] += 1
                    fault = "transient"
                    self._state_file.write_text(json.dumps(state))
            entry = {
                "kind": kind,
                "op": operation,
                "paths": names,
                "pid": os.getpid(),
                "fault": fault,
            }
            with open(self._log_file, "a") as log:
                log.write(json.dumps(entry) + "\n")
        if fault == "transient":
            raise InjectedTransientFault(f"injected transient fault ({operation})")
        if fault == "permanent":
            # Like an object store's refusal: an answer, never worth retrying. The
            # message deliberately leaves out the path: naming it is the job's task.
            raise PermissionError(f"injected permanent fault: access denied ({operation})")

    def consumed(self) -> dict[str, int]:
        """Transient faults injected so far: {"read": n, "write": n}."""
        with self._locked():
            return json.loads(self._state_file.read_text())

    def operations(self) -> list[dict[str, Any]]:
        """Every operation seen so far, in every process, in order."""
        if not self._log_file.exists():
            return []
        with self._locked():
            lines = self._log_file.read_text().splitlines()
        return [json.loads(line) for line in lines if line]

    # paths -----------------------------------------------------------------------

    def _strip_protocol(self, path):  # an instance method here: the inner one decides
        return self.inner._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return self.inner.unstrip_protocol(name)

    def invalidate_cache(self, path=None):
        return self.inner.invalidate_cache(path)

    # reads -----------------------------------------------------------------------

    def exists(self, path, **kwargs):
        self._check(READ, "exists", path)
        return self.inner.exists(path, **kwargs)

    def info(self, path, **kwargs):
        self._check(READ, "info", path)
        return self.inner.info(path, **kwargs)

    def isdir(self, path):
        self._check(READ, "isdir", path)
        return self.inner.isdir(path)

    def isfile(self, path):
        self._check(READ, "isfile", path)
        return self.inner.isfile(path)

    def ls(self, path, detail=True, **kwargs):
        self._check(READ, "ls", path)
        return self.inner.ls(path, detail=detail, **kwargs)

    def find(self, path, maxdepth=None, withdirs=False, detail=False, **kwargs):
        self._check(READ, "find", path)
        return self.inner.find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)

    def glob(self, path, maxdepth=None, **kwargs):
        self._check(READ, "glob", path)
        return self.inner.glob(path, maxdepth=maxdepth, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._check(READ, "cat_file", path)
        return self.inner.cat_file(path, start=start, end=end, **kwargs)

    def open(self, path, mode="rb", **kwargs):
        kind = WRITE if any(flag in mode for flag in "wax+") else READ
        self._check(kind, f"open({mode})", path)
        return self.inner.open(path, mode, **kwargs)

    # writes ----------------------------------------------------------------------

    def pipe_file(self, path, value, **kwargs):
        self._check(WRITE, "pipe_file", path)
        return self.inner.pipe_file(path, value, **kwargs)

    def put_file(self, lpath, rpath, **kwargs):
        self._check(WRITE, "put_file", rpath)
        return self.inner.put_file(lpath, rpath, **kwargs)

    def mv(self, path1, path2, **kwargs):
        self._check(WRITE, "mv", path1, path2)
        return self.inner.mv(path1, path2, **kwargs)

    def rm_file(self, path):
        self._check(WRITE, "rm_file", path)
        return self.inner.rm_file(path)

    def rm(self, path, recursive=False, maxdepth=None):
        self._check(WRITE, "rm", path)
        return self.inner.rm(path, recursive=recursive, maxdepth=maxdepth)

    def makedirs(self, path, exist_ok=False):
        self._check(WRITE, "makedirs", path)
        return self.inner.makedirs(path, exist_ok=exist_ok)

    def mkdir(self, path, create_parents=True, **kwargs):
        self._check(WRITE, "mkdir", path)
        return self.inner.mkdir(path, create_parents=create_parents, **kwargs)


# fsspec's metaclass gives every filesystem class its own instance cache and lock. Ray
# workers may be unable to import `tests` (they are when the driver runs from the repo
# root), so test modules ship this module by value (cloudpickle.register_pickle_by_value),
# and a class pickled by value must not hold a lock. This class is never cached, so drop
# them: lookups fall through to AbstractFileSystem's.
for _attribute in ("_cache", "_instantiation_lock", "_pid"):
    delattr(FaultyFileSystem, _attribute)
del _attribute
