"""koala-batch: batch text-to-image with KOALA models on Ray Data.

import koala_batch
record = koala_batch.run("jobs/smoke.yaml")

or, inside your own Ray Data pipeline:
images = koala_batch.generate_images(prompts_dataset, "jobs/smoke.yaml")
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("koala-batch")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from koala_batch.errors import JobFailedError, KoalaBatchError, SpecError
from koala_batch.runtime.graph import Substitutes, generate_images, generation_spec
from koala_batch.runtime.job import run
from koala_batch.spec import JobSpec, load_spec

__all__ = [
    "JobFailedError",
    "JobSpec",
    "KoalaBatchError",
    "Substitutes",
    "SpecError",
    "__version__",
    "generate_images",
    "generation_spec",
    "load_spec",
    "run",
]
