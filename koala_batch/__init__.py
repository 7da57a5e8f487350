"""koala-batch: batch text-to-image with KOALA models on Ray Data.

    import koala_batch
    record = koala_batch.run("jobs/smoke.yaml")
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("koala-batch")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from koala_batch.config import JobSpec, SpecError, load_spec  # noqa: E402
from koala_batch.job import JobFailedError, run  # noqa: E402

__all__ = ["JobFailedError", "JobSpec", "SpecError", "__version__", "load_spec", "run"]
