"""Worker faults: failing batches split and recorded, a killed actor, too many failures."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

import koala_batch
from koala_batch import JobFailedError, Substitutes
from tests.conftest import tiny_spec, write_prompt_table
from tests.integration.faulty_generators import (
    FAILING_PROMPT,
    KILL_PROMPT,
    NAN_PROMPT,
    OOM_PROMPT,
    fault_injecting_generator,
    self_killing_generator,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


def read_manifests(output) -> list[dict]:
    rows = []
    for path in sorted((output / "manifests").glob("*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def assert_exactly_once(rows: list[dict], ids: list[str], images_per_prompt: int = 1) -> None:
    pairs = sorted((row["id"], row["image_index"]) for row in rows)
    assert pairs == sorted((i, k) for i in ids for k in range(images_per_prompt))


def test_failing_batches_are_split_and_failures_recorded(tmp_path):
    prompts = [f"a painting of a fox, number {i}" for i in range(10)]
    prompts[2] = OOM_PROMPT
    prompts[5] = FAILING_PROMPT
    prompts[7] = NAN_PROMPT
    ids = [f"row-{i}" for i in range(10)]
    table = write_prompt_table(tmp_path / "in" / "prompts.parquet", prompts, id=ids)
    output = tmp_path / "out"
    calls = tmp_path / "calls"
    calls.mkdir()
    spec = tiny_spec(
        str(table),
        str(output),
        input={"id_column": "id"},
        compute={"batch_size": 4},
        output={"max_failed_fraction": 0.25},
    )

    record = koala_batch.run(spec, Substitutes(generator_cls=fault_injecting_generator(calls)))

    rows = {row["id"]: row for row in read_manifests(output)}
    assert_exactly_once(list(rows.values()), ids)
    assert rows["row-2"]["status"] == "ok"  # out of memory only when batched: split, then fine
    assert rows["row-5"]["status"] == "error"
    assert "injected failure" in rows["row-5"]["error"]
    assert rows["row-7"]["status"] == "error"
    assert "NaN" in rows["row-7"]["error"]
    assert rows["row-5"]["member"] is None and rows["row-5"]["sha256"] is None
    assert all(rows[f"row-{i}"]["status"] == "ok" for i in (0, 1, 3, 4, 6, 8, 9))
    assert record["counts"]["images_failed"] == 2 and record["counts"]["images_ok"] == 8
    calls_made = [
        json.loads(line) for log in calls.glob("*.log") for line in log.read_text().splitlines()
    ]
    assert max(len(call) for call in calls_made) == 4
    # Every failing prompt was retried alone before being recorded as an error.
    for prompt in (OOM_PROMPT, FAILING_PROMPT, NAN_PROMPT):
        assert [prompt] in calls_made, prompt
        assert any(prompt in call and len(call) > 1 for call in calls_made), prompt


def test_job_fails_when_too_many_images_fail(tmp_path):
    prompts = [FAILING_PROMPT, "a red bicycle", "", "   ", "a blue boat"]
    table = write_prompt_table(tmp_path / "in.parquet", prompts)
    output = tmp_path / "out"
    spec = tiny_spec(str(table), str(output), output={"max_failed_fraction": 0.5})
    calls = tmp_path / "calls"
    calls.mkdir()
    with pytest.raises(
        JobFailedError, match=r"3 of 5 images failed \(60.0%\).*max_failed_fraction=0.5"
    ):
        koala_batch.run(spec, Substitutes(generator_cls=fault_injecting_generator(calls)))
    assert not (output / "_SUCCESS").exists()
    rows = read_manifests(output)
    assert len(rows) == 5  # the failures are committed as error rows, nothing dropped
    errors = sorted(row["error"] for row in rows if row["status"] == "error")
    assert errors[0].startswith("RuntimeError: injected failure")
    assert errors[1:] == ["prompt is empty or whitespace only"] * 2


def test_killed_actor_process_is_replaced_and_output_exactly_once(tmp_path):
    prompts = [f"a lighthouse at dusk, {i}" for i in range(12)]
    prompts[6] = KILL_PROMPT
    ids = [f"id-{i}" for i in range(12)]
    table = write_prompt_table(tmp_path / "in.parquet", prompts, id=ids)
    output = tmp_path / "out"
    marker = tmp_path / "killed.pid"
    spec = tiny_spec(
        str(table),
        str(output),
        input={"id_column": "id"},
        compute={"actors": 2, "batch_size": 2},
        output={"rows_per_shard": 3},
    )

    record = koala_batch.run(spec, Substitutes(generator_cls=self_killing_generator(marker)))

    assert marker.exists(), "the actor was never killed: the test did not test anything"
    rows = read_manifests(output)
    assert_exactly_once(rows, ids)
    assert all(row["status"] == "ok" for row in rows)
    assert record["counts"]["images_ok"] == 12
    success = json.loads((output / "_SUCCESS").read_text())
    assert sum(shard["rows"] for shard in success["shards"]) == 12


def test_a_lost_statistics_collector_does_not_fail_a_batch(tmp_path, sample_prompts):
    # As when the collector's node is removed mid-job: the generator's next report fails.
    import ray

    from bench import common
    from koala_batch.runtime.collector import start_stats_collector
    from koala_batch.schemas import STATUS_OK, Col
    from koala_batch.spec import spec_from_dict
    from koala_batch.stages.generate import GenerateImages

    spec = spec_from_dict(tiny_spec("in.parquet", str(tmp_path / "out")))
    collector = start_stats_collector()
    ray.get(collector.collect.remote())
    ray.kill(collector)
    stage = GenerateImages(spec, torch_threads=1, collector=collector)

    done = stage(common.work_rows(spec, sample_prompts.slice(0, 2)))

    assert done.column(Col.STATUS).to_pylist() == [STATUS_OK, STATUS_OK]
    assert stage.collector is None  # reported no more, and the job goes on
