"""One tiny job, then what a reader finds in it: the dataset card, the per-shard stats in
the manifests and `_SUCCESS`, and `koala-batch inspect` through the CLI."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

import koala_batch
from koala_batch.layout import CARD_FILE, SUCCESS_FILE, list_output, manifest_path, recorded_stats
from koala_batch.report import CONTACT_SHEET, THROUGHPUT, sheet_size
from koala_batch.schemas import MANIFEST_COLUMNS
from koala_batch.storage import Storage
from koala_batch.verify import verify_output
from tests.conftest import REPO_ROOT, tiny_spec, write_prompt_table
from tests.integration.conftest import start_local_ray

CLI = str(Path(sys.executable).parent / "koala-batch")
IDS = [f"p{i:02d}" for i in range(10)]
EMPTY, NULL = "p01", "p06"  # one bad row in each of the first two shards
FAILURES = {"prompt is empty or whitespace only": 1, "prompt is null": 1}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, model_cache):
    """A finished 10-image job in 3 shards (4, 4, 2), two of its rows failed; run once."""
    root = tmp_path_factory.mktemp("inspect")
    prompts = [
        "  " if row_id == EMPTY else None if row_id == NULL else f"a red kite, {row_id}"
        for row_id in IDS
    ]
    table = write_prompt_table(root / "in.parquet", prompts, id=IDS)
    output = root / "out"
    spec = tiny_spec(
        str(table),
        str(output),
        input={"id_column": "id"},
        output={"rows_per_shard": 4, "license": "cc-by-4.0", "max_failed_fraction": 0.5},
    )
    start_local_ray()
    record = koala_batch.run(spec)
    return output, record


def manifests(output: Path) -> dict[str, pq.ParquetFile]:
    storage = Storage(str(output))
    return {
        shard: pq.ParquetFile(io.BytesIO(storage.read_bytes(manifest_path(shard))))
        for shard in list_output(storage).committed
    }


def test_the_card_has_the_counts_license_and_columns(finished):
    output, record = finished
    card = (output / CARD_FILE).read_text()
    head, _, body = card.removeprefix("---\n").partition("\n---\n")
    meta = yaml.safe_load(head)

    assert meta["license"] == "cc-by-4.0"
    assert meta["task_categories"] == ["text-to-image"]
    section = meta["koala_batch"]
    assert section["counts"] == {"images": 10, "ok": 8, "failed": 2, "shards": 3}
    assert section["model"]["license"] == "apache-2.0"
    assert set(MANIFEST_COLUMNS) <= set(section["columns"])
    assert section["fingerprint"] == record["fingerprint"]
    assert f'ray.data.read_webdataset("{output}/shards/")' in body
    # koala-batch's own file: the output verifies clean with it
    assert verify_output(str(output)).ok


def test_datasets_loads_the_output_through_the_cards_configs(finished, tmp_path):
    from datasets import load_dataset

    output, _ = finished
    loaded = load_dataset(str(output), split="train", cache_dir=str(tmp_path / "cache"))
    assert loaded.num_rows == 8  # the ok images: error rows live in the manifests only
    assert {"png", "json"} <= set(loaded.column_names)


def test_each_manifest_records_its_shards_stats(finished):
    output, _ = finished
    found = {shard: recorded_stats(file.schema_arrow) for shard, file in manifests(output).items()}

    assert sorted(stats["rows"] for stats in found.values()) == [2, 4, 4]
    failures: dict[str, int] = {}
    for shard, stats in found.items():
        assert stats is not None, shard
        assert stats["ok"] + stats["errors"] == stats["rows"]
        assert sum(stats["failures"].values()) == stats["errors"]
        for reason, count in stats["failures"].items():
            failures[reason] = failures.get(reason, 0) + count
        assert stats["generate_s"] > 0 and stats["encode_s"] > 0  # every shard has ok rows
        assert stats["first_generated_at"] <= stats["last_generated_at"] <= stats["committed_at"]
        assert stats["image_bytes"] > 0
    assert failures == FAILURES


def test_the_job_record_totals_the_stats(finished):
    output, record = finished
    on_disk = json.loads((output / SUCCESS_FILE).read_text())
    stats = on_disk["stats"]

    assert stats["failures_by_reason"] == FAILURES
    shard_seconds = sum(shard["generate_s"] for shard in on_disk["shards"])
    assert stats["generate_s"] == pytest.approx(shard_seconds, abs=1e-3)
    assert stats["gpu_s_per_image"] == pytest.approx(shard_seconds / 8, rel=1e-3)
    assert all(isinstance(shard["failures"], dict) for shard in on_disk["shards"])
    assert record["stats"] == stats


def run_inspect(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, "inspect", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_inspect_prints_the_table_and_writes_both_pictures(finished, tmp_path):
    output, _ = finished
    result = run_inspect(
        str(output), "--out", str(tmp_path / "report"), "--samples", "4", cwd=REPO_ROOT
    )

    assert result.returncode == 0, result.stderr
    assert re.search(r"^images +10$", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^  prompt is null +1$", result.stdout, re.MULTILINE)
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
