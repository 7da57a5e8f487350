"""Each output.format end to end: one job per format, resumed once, then read by its consumers.

Per format, one job (7 rows, one of them an error row, 3 rows per shard: 3 shards) runs
to the end; then one committed shard loses its manifest (a run cut short before that
commit point) and another its data (damage a resume must notice), and the same spec runs
again. Every test reads that resumed output: the resume was exactly-once, `verify`
passes (and fails, naming the file, on a damaged copy), and the consumers the README's
recipes name (`datasets`, `webdataset`, Ray Data, DuckDB) load its images: the recipes
themselves are cut out of README.md and run. The webdataset job is not resumed (that is
test_resume.py's); what a reader finds in an output (the dataset card, the per-shard stats
in the manifests and `_SUCCESS`, `koala-batch inspect` through the CLI) is checked on the
same job outputs, with no job of its own.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

import koala_batch
from koala_batch.cli.inspect import CONTACT_SHEET, THROUGHPUT, sheet_size
from koala_batch.keys import sample_key
from koala_batch.output.commit import claim_output, load_committed, uncommit
from koala_batch.output.layout import (
    CARD_FILE,
    SUCCESS_FILE,
    folder_file_path,
    list_output,
    manifest_path,
    parquet_path,
    recorded_stats,
    tar_path,
)
from koala_batch.output.verify import verify_output
from koala_batch.schemas import MANIFEST_COLUMNS
from koala_batch.spec import spec_from_dict
from koala_batch.stages.write import WriteShard
from koala_batch.storage import Storage
from tests.conftest import REPO_ROOT, tiny_spec, write_prompt_table
from tests.integration.conftest import start_local_ray
from tests.unit.conftest import encoded_table, make_spec

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local", "offline_datasets")]

FORMATS = ("webdataset", "parquet", "files")
IDS = [f"p{i}" for i in range(7)]
PROMPTS = {row_id: f"a koala made of {row_id}" for row_id in IDS}
PROMPTS["p3"] = ""  # an error row: no image in any format
OK_PROMPTS = sorted(prompt for prompt in PROMPTS.values() if prompt)
ROWS_PER_SHARD = 3
FAILURES = {"prompt is empty or whitespace only": 1}  # p3's
LICENSE = "cc-by-4.0"
CLI = str(Path(sys.executable).parent / "koala-batch")


@pytest.fixture(scope="module")
def offline_datasets(tmp_path_factory):
    """Hugging Face `datasets` offline, its cache in a temporary folder (set before it is
    first imported, and on its config in case another test imported it already)."""
    cache = tmp_path_factory.mktemp("hf-home")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            patch.setenv(name, "1")
        patch.setenv("HF_HOME", str(cache))
        patch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
        import datasets.config
        import huggingface_hub.constants

        patch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", cache / "datasets")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


def manifest_rows(output: Path) -> list[dict]:
    return [
        row
        for path in sorted((output / "manifests").glob("*.parquet"))
        for row in pq.read_table(path).to_pylist()
    ]


def data_file(output: Path, shard: str, output_format: str) -> str:
    """A data file of the shard, relative: its tar, its Parquet file or its first image."""
    if output_format == "webdataset":
        return tar_path(shard)
    if output_format == "parquet":
        return parquet_path(shard)
    table = pq.read_table(output / "manifests" / f"{shard}.parquet", columns=["member"])
    return folder_file_path(shard, next(m for m in table.column("member").to_pylist() if m))


@dataclass(frozen=True)
class FormatJob:
    output_format: str
    spec: dict
    output: Path
    first: dict  # the first run's job record
    resumed: dict | None  # the rerun's (None: webdataset, resumed in test_resume.py)
    first_rows: list[dict]  # the manifests' rows after the first run
    cut: str  # the shard whose manifest was deleted
    damaged: str  # the shard whose data were truncated

    @property
    def record(self) -> dict:
        """The last run's job record: the one in `_SUCCESS` and the card."""
        return self.resumed if self.resumed is not None else self.first


# Each format's job, run once per session: the parametrized `job` and `webdataset_job` share it.
JOBS: dict[str, FormatJob] = {}


@pytest.fixture(scope="module", params=FORMATS)
def job(request, tmp_path_factory, model_cache) -> FormatJob:
    return format_job(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def webdataset_job(tmp_path_factory, model_cache) -> FormatJob:
    """The webdataset job (the same run as `job`'s webdataset one), for the checks that
    read that format only."""
    return format_job("webdataset", tmp_path_factory)


def format_job(output_format: str, tmp_path_factory) -> FormatJob:
    if output_format not in JOBS:
        JOBS[output_format] = run_format_job(output_format, tmp_path_factory)
    return JOBS[output_format]


def run_format_job(output_format: str, tmp_path_factory) -> FormatJob:
    root = tmp_path_factory.mktemp(f"format-{output_format}")
    table = write_prompt_table(root / "in.parquet", list(PROMPTS.values()), id=IDS)
    output = root / "out"
    spec = tiny_spec(
        str(table),
        str(output),
        input={"id_column": "id"},
        output={
            "format": output_format,
            "rows_per_shard": ROWS_PER_SHARD,
            "max_failed_fraction": 0.5,
            "license": LICENSE,  # for the card's checks
        },
    )
    start_local_ray()
    first = koala_batch.run(spec)
    first_rows = manifest_rows(output)
    shards = [shard["shard"] for shard in first["shards"]]
    assert len(shards) == 3
    # The damaged shard has images to damage (a shard of the error row alone has no data
    # file in two formats: rows reach the writer in any order).
    damaged = [shard["shard"] for shard in first["shards"] if shard["ok"]][-1]
    cut = next(shard for shard in shards if shard != damaged)
    if output_format == "webdataset":
        # The default format's resume after a cut and damage is test_resume.py's; here
        # its first run serves the consumers (one job run less).
        return FormatJob(output_format, spec, output, first, None, first_rows, cut, damaged)
    (output / "manifests" / f"{cut}.parquet").unlink()
    broken = output / data_file(output, damaged, output_format)
    broken.write_bytes(broken.read_bytes()[:50])
    resumed = koala_batch.run(spec)
    return FormatJob(output_format, spec, output, first, resumed, first_rows, cut, damaged)


# ---------------------------------------------------------------------------------------
# the commit protocol holds in every format


def test_the_resume_regenerates_exactly_the_uncommitted_shards(job):
    if job.resumed is None:
        pytest.skip("webdataset: resumed after a cut and damage in test_resume.py")
    rows = manifest_rows(job.output)
    by_shard = {shard["shard"]: shard["rows"] for shard in job.first["shards"]}

    assert job.first["counts"]["images_committed"] == len(IDS)
    assert job.resumed["resumed"] is True
    assert job.resumed["counts"]["images_written_this_run"] == (
        by_shard[job.cut] + by_shard[job.damaged]
    )
    # Exactly once: every planned image has one row.
    assert sorted(row["id"] for row in rows) == IDS
    assert len({row["key"] for row in rows}) == len(IDS)
    # The committed shard is kept as it was; the cut and damaged shards' images are made
    # again, into as many new shards (grouped in the order they arrive, so not
    # necessarily as before).
    before = {row["key"]: row["shard"] for row in job.first_rows}
    after = {row["key"]: row["shard"] for row in rows}
    (kept,) = set(by_shard) - {job.cut, job.damaged}
    assert {key for key, shard in after.items() if shard == kept} == {
        key for key, shard in before.items() if shard == kept
    }
    assert len(job.resumed["shards"]) == len(job.first["shards"])
    assert kept in {shard["shard"] for shard in job.resumed["shards"]}
    listing = list_output(Storage(str(job.output)))
    assert listing.leftovers == () and listing.foreign == ()
    # Nor an empty folder where a shard was taken out, which folder walkers would read.
    folders = [path for path in (job.output / "shards").iterdir() if path.is_dir()]
    assert all(any(folder.iterdir()) for folder in folders), folders
    errors = [row for row in rows if row["status"] == "error"]
    assert [row["id"] for row in errors] == ["p3"] and errors[0]["member"] is None


def test_verify_passes_the_resumed_output(job):
    report = verify_output(str(job.output), spec=spec_from_dict(job.spec))

    assert report.ok, report.format()
    assert report.images_checked == len(OK_PROMPTS)
    assert report.rows_failed == 1


def test_verify_names_a_damaged_or_missing_data_file(job, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(job.output, output)
    # Two shards with images (the resume may have named its shards anew, and a shard of
    # the error row alone has no data file in two formats).
    with_images = sorted({row["shard"] for row in manifest_rows(output) if row["status"] == "ok"})
    truncated = data_file(output, with_images[0], job.output_format)
    path = output / truncated
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    deleted = data_file(output, with_images[1], job.output_format)
    (output / deleted).unlink()

    report = verify_output(str(output))

    assert not report.ok
    for relative in (truncated, deleted):
        assert any(relative in problem for problem in report.problems), (relative, report.problems)


@pytest.mark.parametrize("output_format", ["parquet", "files"])
def test_each_format_on_s3_is_written_checked_and_uncommitted(s3_server, s3_bucket, output_format):
    url = f"s3://{s3_bucket}/out"
    storage = Storage(url, s3_server.storage_options)
    spec = make_spec(
        url, output={"format": output_format, "storage_options": s3_server.storage_options}
    )
    claim_output(storage, spec)
    writer = WriteShard(spec)
    kept = writer(encoded_table(spec, ["a", "b", "c"], errors={1})).column("shard")[0].as_py()
    cut = writer(encoded_table(spec, ["d", "e"], first_ordinal=3)).column("shard")[0].as_py()
    assert verify_output(url, s3_server.storage_options).ok
    assert load_committed(storage).damaged == {}

    relative = {
        "parquet": parquet_path(cut),
        "files": folder_file_path(cut, f"{sample_key('e', 0)}.png"),
    }
    storage.write_bytes(relative[output_format], b"cut short")
    state = load_committed(storage)
    assert list(state.damaged) == [cut] and relative[output_format] in state.damaged[cut]
    assert any(
        relative[output_format] in p for p in verify_output(url, s3_server.storage_options).problems
    )

    uncommit(storage, [cut])
    listing = list_output(storage)
    assert listing.committed == (kept,)
    assert [path for path in listing.files if cut in path] == []
    assert verify_output(url, s3_server.storage_options).ok


# ---------------------------------------------------------------------------------------
# the consumers, through the README's recipes


def recipes() -> dict[str, str]:
    """Every `<!-- recipe: NAME -->` python block of README.md, by name."""
    text = (REPO_ROOT / "README.md").read_text()
    found = re.findall(r"<!-- recipe: ([\w-]+) -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert len(found) == text.count("<!-- recipe:"), "a recipe marker without a python block"
    return dict(found)


def check_parquet_datasets(namespace: dict[str, Any]) -> None:
    from PIL import Image

    dataset = namespace["dataset"]
    assert len(dataset) == len(OK_PROMPTS)
    assert isinstance(namespace["image"], Image.Image)
    assert namespace["image"].size == (64, 64)
    assert sorted(dataset["prompt"]) == OK_PROMPTS
    assert dataset.features["image"].__class__.__name__ == "Image"


def check_ray_parquet(namespace: dict[str, Any]) -> None:
    dataset = namespace["dataset"]
    assert dataset.count() == len(OK_PROMPTS)
    assert sorted(row["prompt"] for row in dataset.take_all()) == OK_PROMPTS
    image = namespace["first"]["image"]
    assert image["bytes"].startswith(b"\x89PNG") and image["path"].endswith(".png")


def check_parquet_duckdb(namespace: dict[str, Any]) -> None:
    rows = namespace["rows"]
    assert sorted(prompt for _, prompt, _ in rows) == OK_PROMPTS
    assert all(png.startswith(b"\x89PNG") for _, _, png in rows)


def check_webdataset_datasets(namespace: dict[str, Any]) -> None:
    from PIL import Image

    dataset = namespace["dataset"]
    assert len(dataset) == len(OK_PROMPTS)
    assert isinstance(namespace["image"], Image.Image)
    assert sorted(record["prompt"] for record in dataset["json"]) == OK_PROMPTS


def check_webdataset(namespace: dict[str, Any]) -> None:
    samples = list(namespace["dataset"])
    assert len(samples) == len(OK_PROMPTS)
    assert sorted(record["prompt"] for _, record in samples) == OK_PROMPTS
    assert {image.size for image, _ in samples} == {(64, 64)}


def check_ray_webdataset(namespace: dict[str, Any]) -> None:
    dataset = namespace["dataset"]
    assert dataset.count() == len(OK_PROMPTS)
    assert namespace["first"]["png"].shape == (64, 64, 3)
    assert sorted(row["json"]["prompt"] for row in dataset.take_all()) == OK_PROMPTS


def check_files_datasets(namespace: dict[str, Any]) -> None:
    from PIL import Image

    dataset = namespace["dataset"]
    assert len(dataset) == len(OK_PROMPTS)
    assert isinstance(namespace["image"], Image.Image)
    assert sorted(dataset["prompt"]) == OK_PROMPTS


def check_files_pil(namespace: dict[str, Any]) -> None:
    images = namespace["images"]
    assert len(images) == len(OK_PROMPTS)
    assert sorted(prompt for _, prompt in images) == OK_PROMPTS
    assert {image.size for image, _ in images} == {(64, 64)}


def check_manifests_duckdb(namespace: dict[str, Any]) -> None:
    assert namespace["failed"] == [("p3", "", "prompt is empty or whitespace only")]


# Each README recipe: the output format it reads, and what it must have loaded.
RECIPE_CHECKS = {
    "parquet-datasets": ("parquet", check_parquet_datasets),
    "parquet-ray": ("parquet", check_ray_parquet),
    "parquet-duckdb": ("parquet", check_parquet_duckdb),
    "webdataset-datasets": ("webdataset", check_webdataset_datasets),
    "webdataset-webdataset": ("webdataset", check_webdataset),
    "webdataset-ray": ("webdataset", check_ray_webdataset),
    "files-datasets": ("files", check_files_datasets),
    "files-pil": ("files", check_files_pil),
    "manifests-duckdb": ("files", check_manifests_duckdb),
}


def test_every_readme_recipe_is_checked_here():
    assert sorted(recipes()) == sorted(RECIPE_CHECKS)
    assert {output_format for output_format, _ in RECIPE_CHECKS.values()} == set(FORMATS)


def test_readme_recipes_load_the_output(job):
    """Each recipe for this format, OUTPUT replaced by the output's path, run as written."""
    import ray.data

    names = [name for name, (fmt, _) in RECIPE_CHECKS.items() if fmt == job.output_format]
    code = recipes()
    failures = {}
    # Ray Data 2.60's file datasources (v2, its default) spend 10 to 14 s here in their
    # ListFiles task, whatever the number of files; v1 reads the same files through the
    # same calls in under a second. The recipes are checked for what they load.
    context = ray.data.DataContext.get_current()
    v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        for name in names:
            namespace: dict[str, Any] = {}
            source = code[name].replace("OUTPUT", str(job.output))
            try:
                exec(compile(source, f"README.md recipe {name}", "exec"), namespace)
                RECIPE_CHECKS[name][1](namespace)
            except Exception as exc:  # noqa: BLE001 - every recipe runs; all failures are shown
                failures[name] = f"{type(exc).__name__}: {exc}"
    finally:
        context.use_datasource_v2 = v2
    assert names and not failures, failures


# ---------------------------------------------------------------------------------------
# what a reader finds: the dataset card, the stats, `koala-batch inspect`
# (moved from test_inspect.py, which ran a job of its own)

# The card's Ray Data line for each format's shards.
CARD_RAY_LINES = {
    "webdataset": 'ray.data.read_webdataset("{output}/shards/")',
    "parquet": 'ray.data.read_parquet("{output}/shards/")',
    "files": 'ray.data.read_images("{output}/shards/", include_paths=True)',
}


def manifests(output: Path) -> dict[str, pq.ParquetFile]:
    storage = Storage(str(output))
    return {
        shard: pq.ParquetFile(io.BytesIO(storage.read_bytes(manifest_path(shard))))
        for shard in list_output(storage).committed
    }


def test_the_card_has_the_counts_license_and_columns(job):
    card = (job.output / CARD_FILE).read_text()
    head, _, body = card.removeprefix("---\n").partition("\n---\n")
    meta = yaml.safe_load(head)

    assert meta["license"] == LICENSE
    assert meta["task_categories"] == ["text-to-image"]
    section = meta["koala_batch"]
    assert section["counts"] == {
        "images": len(IDS),
        "ok": len(OK_PROMPTS),
        "failed": 1,
        "shards": 3,
    }
    assert section["model"]["license"] == "apache-2.0"
    assert section["output_format"] == job.output_format
    assert set(MANIFEST_COLUMNS) <= set(section["columns"])
    assert section["fingerprint"] == job.record["fingerprint"]
    assert CARD_RAY_LINES[job.output_format].format(output=job.output) in body
    # koala-batch's own file: the output verifies clean with it
    assert verify_output(str(job.output)).ok


def test_datasets_loads_the_output_through_the_cards_configs(webdataset_job, tmp_path):
    from datasets import load_dataset

    output = webdataset_job.output
    loaded = load_dataset(str(output), split="train", cache_dir=str(tmp_path / "cache"))
    assert loaded.num_rows == len(OK_PROMPTS)  # the ok images: error rows live in the manifests
    assert {"png", "json"} <= set(loaded.column_names)


def test_each_manifest_records_its_shards_stats(job):
    found = {
        shard: recorded_stats(file.schema_arrow) for shard, file in manifests(job.output).items()
    }

    assert sorted(stats["rows"] for stats in found.values()) == [1, 3, 3]
    failures: dict[str, int] = {}
    for shard, stats in found.items():
        assert stats is not None, shard
        assert stats["ok"] + stats["errors"] == stats["rows"]
        assert sum(stats["failures"].values()) == stats["errors"]
        for reason, count in stats["failures"].items():
            failures[reason] = failures.get(reason, 0) + count
        # Seconds are spent on ok images only: the error row may form a shard of its own
        # (rows reach the writer in any order), which then records none.
        if stats["ok"]:
            assert stats["generate_s"] > 0 and stats["encode_s"] > 0, (shard, stats)
            assert stats["image_bytes"] > 0, (shard, stats)
        else:
            assert stats["generate_s"] == 0 and stats["encode_s"] == 0, (shard, stats)
            assert stats["image_bytes"] == 0, (shard, stats)
        moments = ("first_generated_at", "last_generated_at", "committed_at")
        assert sorted(stats[name] for name in moments) == [stats[name] for name in moments]
    assert failures == FAILURES


def test_the_job_record_totals_the_stats(job):
    on_disk = json.loads((job.output / SUCCESS_FILE).read_text())
    stats = on_disk["stats"]

    assert stats["failures_by_reason"] == FAILURES
    shard_seconds = sum(shard["generate_s"] for shard in on_disk["shards"])
    assert stats["generate_s"] == pytest.approx(shard_seconds, abs=1e-3)
    assert stats["gpu_s_per_image"] == pytest.approx(shard_seconds / len(OK_PROMPTS), rel=1e-3)
    assert all(isinstance(shard["failures"], dict) for shard in on_disk["shards"])
    assert job.record["stats"] == stats


def run_inspect(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, "inspect", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_inspect_prints_the_table_and_writes_both_pictures(webdataset_job, tmp_path):
    output = webdataset_job.output
    result = run_inspect(
        str(output), "--out", str(tmp_path / "report"), "--samples", "4", cwd=REPO_ROOT
    )

    assert result.returncode == 0, result.stderr
    assert re.search(rf"^images +{len(IDS)}$", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^  prompt is empty or whitespace only +1$", result.stdout, re.MULTILINE)
    assert re.search(r"^shards +3 \(webdataset\)$", result.stdout, re.MULTILINE)
    assert re.search(r"^GPU-s/image +\d+\.\d{4}$", result.stdout, re.MULTILINE)
    with Image.open(tmp_path / "report" / CONTACT_SHEET) as sheet:
        assert sheet.format == "PNG" and sheet.size == sheet_size(4)
    with Image.open(tmp_path / "report" / THROUGHPUT) as plot:
        plot.load()
        assert plot.format == "PNG"

    # without --out: a new folder in the current directory, named after the output
    again = run_inspect(str(output), "--samples", "2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    (made,) = tmp_path.glob("inspect-out-*")
    assert {path.name for path in made.iterdir()} == {CONTACT_SHEET, THROUGHPUT}
