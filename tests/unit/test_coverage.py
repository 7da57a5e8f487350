"""An output against what the input plans, by key and by what each key was made from:
the refusals before a run and the check before `_SUCCESS` (no Ray: shards written by the
write stage from tables built in memory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from koala_batch.errors import JobFailedError, OutputConflictError
from koala_batch.inputs.files import plan_input
from koala_batch.inputs.rows import planned_keys
from koala_batch.output.commit import claim_output, load_committed
from koala_batch.output.coverage import changed_failures, check_complete, check_resume
from koala_batch.stages.write import WriteShard
from koala_batch.storage import Storage
from tests.conftest import write_prompt_table
from tests.unit.conftest import encoded_table, make_spec

IDS = ["a", "b", "c", "d"]


def prompts_for(ids: list[str], **changed: str) -> list[str]:
    """The prompts `encoded_table` generated these ids from, some changed."""
    return [changed.get(row_id, f"a photo of thing {row_id}") for row_id in ids]


@pytest.fixture
def output(tmp_path) -> Path:
    """An output holding a, b, c and d, d as an error row (an empty prompt)."""
    out_dir = tmp_path / "out"
    spec = make_spec(out_dir, str(tmp_path / "unused.parquet"))
    claim_output(Storage(str(out_dir)), spec, run_id="run-1")
    WriteShard(spec, run_id="run-1")(encoded_table(spec, IDS, errors={3}))
    return out_dir


def check(tmp_path: Path, output: Path, ids: list[str], prompts: list[str], **spec_output):
    """check_resume, then check_complete, of the output against an input of these rows."""
    table = write_prompt_table(tmp_path / "prompts.parquet", prompts, id=ids)
    spec = make_spec(output, str(table), input={"id_column": "id"}, output=spec_output)
    plan = plan_input(spec.input, None, spec.output.uri, images_per_prompt=1)
    planned = planned_keys(spec, plan)
    storage = Storage(str(output))
    committed = load_committed(storage)
    check_resume(storage, spec, plan, committed, planned)
    check_complete(storage, spec, plan, committed, planned)
    return committed, planned


def test_the_input_the_output_was_made_from_passes_both_checks(tmp_path, output):
    committed, planned = check(tmp_path, output, IDS, prompts_for(IDS, d=""))
    assert planned.overlap(committed.keys) == len(planned) == 4


def test_as_many_rows_of_other_ids_are_stale_not_done(tmp_path, output):
    others = ["e", "f", "g", "h"]
    with pytest.raises(OutputConflictError) as refused:
        check(tmp_path, output, others, prompts_for(others))
    assert f"output {output.as_uri()} holds 4 committed image(s) of rows not in" in str(
        refused.value
    )
    assert "output.accumulate: true" in str(refused.value)


def test_an_accumulating_output_keeps_stale_keys_but_still_wants_every_planned_one(
    tmp_path, output
):
    ids = ["c", "d", "e"]
    with pytest.raises(JobFailedError, match=r"1 planned image\(s\) are not committed.*id 'e'"):
        check(tmp_path, output, ids, prompts_for(ids, d=""), accumulate=True)


def test_a_prompt_changed_under_the_same_id_is_refused_naming_an_example(tmp_path, output):
    with pytest.raises(OutputConflictError) as refused:
        check(tmp_path, output, IDS, prompts_for(IDS, c="a photo of another thing", d=""))
    message = str(refused.value)
    assert "1 committed image(s) were generated from input rows that have changed" in message
    assert "e.g. id 'c' image 0 (prompts.parquet row 2)" in message


@pytest.mark.parametrize(
    "change", [{"negative_prompt": ["", "", "blurry", ""]}, {"seed": [1, 2, 3, 4]}]
)
def test_a_negative_prompt_or_seed_changed_is_a_changed_row(tmp_path, output, change):
    table = write_prompt_table(
        tmp_path / "prompts.parquet", prompts_for(IDS, d=""), id=IDS, **change
    )
    [(column, values)] = change.items()
    role = {"negative_prompt": "negative_prompt_column", "seed": "seed_column"}[column]
    spec = make_spec(output, str(table), input={"id_column": "id", role: column})
    plan = plan_input(spec.input, None, spec.output.uri, images_per_prompt=1)
    storage = Storage(str(output))
    with pytest.raises(OutputConflictError, match="have changed"):
        check_resume(storage, spec, plan, load_committed(storage), planned_keys(spec, plan))


def test_a_failed_row_may_change(tmp_path, output):
    committed, planned = check(tmp_path, output, IDS, prompts_for(IDS, d="a photo, fixed"))
    assert changed_failures(committed, planned) == 1
