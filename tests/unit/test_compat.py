"""koala_batch.compat is the one door to dependencies' private insides: nothing else in
the package names them, and each touch still finds what it reaches for in the installed
versions (a change there fails here, naming the touch). Touches that need a running Ray
are checked in tests/integration/test_compat.py."""

from __future__ import annotations

import importlib.util
import inspect
import re

import pytest
from fsspec.implementations.local import LocalFileSystem
from s3fs import S3FileSystem

from koala_batch import compat
from tests.conftest import REPO_ROOT

PACKAGE_DIR = REPO_ROOT / "koala_batch"
# Private names of Ray, Ray Data, fsspec and diffusers that the package reaches for.
PRIVATE_NAMES = re.compile(
    r"(?<!\w)(_private|_logical_plan|_strip_protocol|_guidance_scale)\b|dircache|peft_utils"
)


def test_no_module_but_compat_names_a_dependencys_private_insides():
    named = {
        f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}"
        for path in PACKAGE_DIR.rglob("*.py")
        if path.name != "compat.py" or path.parent != PACKAGE_DIR
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE_NAMES.search(line)
    }
    assert named == set(), "move these touches into koala_batch/compat.py"


@pytest.mark.parametrize(
    ("filesystem", "url", "path"),
    [
        (LocalFileSystem, "file:///data/prompts", "/data/prompts"),
        (S3FileSystem, "s3://bucket/prompts/a.parquet", "bucket/prompts/a.parquet"),
    ],
)
def test_strip_protocol_still_gives_the_filesystems_path(filesystem, url, path):
    # fsspec's AbstractFileSystem._strip_protocol, on a filesystem or its class.
    assert compat.strip_protocol(filesystem, url) == path


def test_the_pipeline_still_reads_its_guidance_scale_where_the_cutoff_sets_it():
    from diffusers import StableDiffusionXLPipeline

    # StableDiffusionXLPipeline._guidance_scale, which set_guidance_scale writes.
    source = inspect.getsource(StableDiffusionXLPipeline.do_classifier_free_guidance.fget)
    assert "self._guidance_scale" in source, (
        "StableDiffusionXLPipeline.do_classifier_free_guidance no longer reads _guidance_scale"
    )


def test_rays_private_modules_that_compat_names_still_exist():
    # The logger Ray's token-authentication notes come from, and the cluster config state.
    assert importlib.util.find_spec(compat.RAY_AUTH_SETUP_LOGGER) is not None, (
        f"{compat.RAY_AUTH_SETUP_LOGGER} is gone: its notes would reach the console"
    )
    from ray._private.state import state

    assert callable(getattr(state, "get_cluster_config", None)), (
        "ray._private.state.state.get_cluster_config is gone: autoscaler limits unread"
    )
