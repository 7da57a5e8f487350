"""Per-row generation parameters and reader-safe types: the rules, the work rows they
make, and the images planning counts from them."""

from __future__ import annotations

import json
import math
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from koala_batch.errors import InputError, OutputConflictError, SpecError
from koala_batch.inputs.files import check_schema, count_images, plan_input
from koala_batch.inputs.rows import (
    ORDINAL_STRIDE,
    parse_row_guidance_scale,
    parse_row_images_per_prompt,
    parse_row_seed,
    parse_row_side,
    parse_row_steps,
)
from koala_batch.keys import derived_seed, sample_key
from koala_batch.output.commit import JOB_FILE_FORMAT, claim_output
from koala_batch.output.verify import verify_output
from koala_batch.schemas import MANIFEST_FIELDS, WORK_FIELDS, Col
from koala_batch.spec import InputSpec
from koala_batch.stages.expand import ExpandImages
from koala_batch.storage import Storage
from tests.unit.conftest import make_spec

FILE = "s3://bucket/prompts/part-0.parquet"

# ---------------------------------------------------------------------------------------
# The rules


@pytest.mark.parametrize(
    ("parse", "value", "expected"),
    [
        (parse_row_steps, None, None),
        (parse_row_steps, float("nan"), None),
        (parse_row_steps, 1, 1),
        (parse_row_steps, 1000, 1000),
        (parse_row_steps, 30.0, 30),
        (parse_row_steps, Decimal("12"), 12),
        (parse_row_guidance_scale, 0, 0.0),
        (parse_row_guidance_scale, 7.5, 7.5),
        (parse_row_guidance_scale, 100, 100.0),
        (parse_row_guidance_scale, None, None),
        (parse_row_side, 8, 8),
        (parse_row_side, 8192, 8192),
        (parse_row_side, 512.0, 512),
        (parse_row_side, None, None),
        (parse_row_images_per_prompt, 1, 1),
        (parse_row_images_per_prompt, 1000, 1000),
        (parse_row_images_per_prompt, None, None),
    ],
)
def test_usable_parameter_values(parse, value, expected):
    parsed, problem = parse(value)
    assert problem is None
    assert parsed == expected and type(parsed) is type(expected)


@pytest.mark.parametrize(
    ("parse", "value", "reason"),
    [
        (parse_row_steps, 0, "value 0 is outside 1 to 1000"),
        (parse_row_steps, 1001, "value 1001 is outside 1 to 1000"),
        (parse_row_steps, 2.5, "value 2.5 is not a whole number"),
        (parse_row_steps, True, "value True is not an integer"),
        (parse_row_steps, "20", "value '20' is not an integer"),
        (parse_row_steps, float("inf"), "is not an integer"),
        (parse_row_guidance_scale, -0.5, "value -0.5 is outside 0 to 100"),
        (parse_row_guidance_scale, 100.5, "value 100.5 is outside 0 to 100"),
        (parse_row_guidance_scale, float("-inf"), "is not a number"),
        (parse_row_side, 0, "value 0 is outside 8 to 8192"),
        (parse_row_side, 8200, "value 8200 is outside 8 to 8192"),
        (parse_row_side, 100, "value 100 is not a multiple of 8"),
        (parse_row_side, 64.5, "not a whole number"),
        (parse_row_images_per_prompt, 0, "value 0 is outside 1 to 1000"),
        (parse_row_images_per_prompt, 1001, "value 1001 is outside 1 to 1000"),
        (parse_row_images_per_prompt, -2, "outside 1 to 1000"),
    ],
)
def test_bad_parameter_values_give_a_reason(parse, value, reason):
    parsed, problem = parse(value)
    assert parsed is None
    assert problem is not None and reason in problem


def test_seeds_are_refused_from_2_63_up():
    assert parse_row_seed(2**63 - 1) == (2**63 - 1, None)
    for value in (2**63, 2**64 - 1, -1):
        seed, problem = parse_row_seed(value)
        assert seed is None and problem == f"seed {value} is outside 0 to 2**63-1"


# ---------------------------------------------------------------------------------------
# Work rows


def input_table(columns: dict[str, pa.Array], first_ordinal: int = 0) -> pa.Table:
    count = len(next(iter(columns.values())))
    provenance = {
        "source": pa.array(["part-0.parquet"] * count),
        "row_index": pa.array(range(count), pa.int64()),
        "row_ordinal": pa.array(range(first_ordinal, first_ordinal + count), pa.int64()),
    }
    return pa.table({**provenance, **columns})


PARAMETER_COLUMNS = {
    "steps_column": "s",
    "guidance_scale_column": "g",
    "width_column": "w",
    "height_column": "h",
    "images_per_prompt_column": "n",
}


def params_spec(**input_fields):
    return make_spec(
        "out",
        input={"id_column": "id", **PARAMETER_COLUMNS, **input_fields},
        generation={
            "steps": 2,
            "guidance_scale": 5.0,
            "width": 64,
            "height": 64,
            "images_per_prompt": 2,
            "seed": 7,
        },
    )


PARAMETER_ROWS = {
    "id": pa.array(["plain", "own", "bad-w", "bad-n", "three", "bad-s-g"]),
    "prompt": pa.array(["a", "b", "c", "d", "e", "f"]),
    "s": pa.array([None, 3, None, None, 1, 0], pa.int64()),
    "g": pa.array([None, 7.5, None, None, None, 101.0], pa.float64()),
    "w": pa.array([None, 32, 100, None, 32, None], pa.int64()),
    "h": pa.array([None, 48, None, None, 48, None], pa.int32()),
    "n": pa.array([None, 1, None, 0, 3, None], pa.float64()),
}


@pytest.fixture(scope="module")
def expanded() -> pa.Table:
    return ExpandImages(params_spec())(input_table(PARAMETER_ROWS, first_ordinal=5))


def by_pair(table: pa.Table) -> dict[tuple[str, int], dict]:
    return {(row["id"], row["image_index"]): row for row in table.to_pylist()}


def test_rows_carry_their_own_parameters_and_the_spec_defaults(expanded):
    rows = by_pair(expanded)

    assert expanded.schema == pa.schema(WORK_FIELDS)
    plain = rows[("plain", 0)]
    assert (plain["steps"], plain["guidance_scale"], plain["width"], plain["height"]) == (
        2,
        5.0,
        64,
        64,
    )
    own = rows[("own", 0)]
    assert (own["steps"], own["guidance_scale"], own["width"], own["height"]) == (3, 7.5, 32, 48)
    assert own["status"] == "ok" and ("own", 1) not in rows  # its own images_per_prompt: 1
    assert [rows[("three", k)]["steps"] for k in range(3)] == [1, 1, 1]


def test_bad_parameter_values_are_error_rows_naming_the_column(expanded):
    rows = by_pair(expanded)

    assert {rows[("bad-w", k)]["error"] for k in range(2)} == {
        "width column 'w': value 100 is not a multiple of 8"
    }
    both = rows[("bad-s-g", 0)]["error"]
    assert both == (
        "steps column 's': value 0 is outside 1 to 1000; "
        "guidance_scale column 'g': value 101.0 is outside 0 to 100"
    )


def test_a_bad_images_per_prompt_value_gives_exactly_one_error_row(expanded):
    pairs = [pair for pair in by_pair(expanded) if pair[0] == "bad-n"]
    assert pairs == [("bad-n", 0)]
    row = by_pair(expanded)[("bad-n", 0)]
    assert row["status"] == "error"
    assert row["error"] == "images_per_prompt column 'n': value 0.0 is outside 1 to 1000"
    assert row["key"] == sample_key("bad-n", 0)


def test_images_per_prompt_per_row_and_the_fixed_ordinal_stride(expanded):
    rows = by_pair(expanded)
    counts = {
        row_id: sum(1 for pair in rows if pair[0] == row_id)
        for row_id in PARAMETER_ROWS["id"].to_pylist()
    }
    assert counts == {"plain": 2, "own": 1, "bad-w": 2, "bad-n": 1, "three": 3, "bad-s-g": 2}
    # row_ordinal 5.. : ordinal = row_ordinal * 1000 + image index, whatever the counts
    assert ORDINAL_STRIDE == 1000
    assert rows[("plain", 1)]["ordinal"] == 5 * 1000 + 1
    assert rows[("three", 2)]["ordinal"] == 9 * 1000 + 2
    assert len(set(expanded.column(Col.ORDINAL).to_pylist())) == expanded.num_rows


def test_without_a_count_column_ordinals_keep_their_old_numbering():
    spec = params_spec(images_per_prompt_column=None)
    out = ExpandImages(spec)(input_table(PARAMETER_ROWS, first_ordinal=5))
    plain = [row for row in out.to_pylist() if row["id"] == "plain"]
    assert sorted(row["ordinal"] for row in plain) == [10, 11]  # row_ordinal * 2 + k


def test_work_rows_are_sorted_by_bucket_stably(expanded):
    buckets = list(
        zip(
            *(expanded.column(name).to_pylist() for name in ("width", "height", "steps")),
            strict=True,
        )
    )
    assert buckets == sorted(buckets)
    # Within a bucket rows keep their input order (and image order).
    full = [
        (row["id"], row["image_index"])
        for row in expanded.to_pylist()
        if (row["width"], row["height"], row["steps"], row["guidance_scale"]) == (64, 64, 2, 5.0)
    ]
    # (a bad value leaves the spec's in its place: the row is an error row anyway)
    assert full == [
        ("plain", 0),
        ("plain", 1),
        ("bad-w", 0),
        ("bad-w", 1),
        ("bad-n", 0),
        ("bad-s-g", 0),
        ("bad-s-g", 1),
    ]


def test_rows_without_parameter_columns_keep_their_order():
    spec = make_spec("out", generation={"images_per_prompt": 1})
    out = ExpandImages(spec)(input_table({"prompt": pa.array(["z", "a", "m"])}))
    assert out.column("prompt").to_pylist() == ["z", "a", "m"]


def test_planning_counts_the_images_validation_makes(expanded):
    assert count_images(PARAMETER_ROWS["n"].to_pylist(), 2) == expanded.num_rows
    assert count_images([None, math.nan, 4, "x", 1001, 2.0], 3) == 3 + 3 + 4 + 1 + 1 + 2


def test_plan_counts_images_per_prompt_column_or_rows_times_the_spec(tmp_path):
    pq.write_table(
        pa.table({"prompt": ["a", "b", "c"], "n": pa.array([2, None, 0], pa.int64())}),
        tmp_path / "a.parquet",
    )
    pq.write_table(
        pa.table({"prompt": ["d"], "n": pa.array([5], pa.int64())}), tmp_path / "b.parquet"
    )

    with_column = plan_input(
        InputSpec(uri=str(tmp_path), images_per_prompt_column="n"), images_per_prompt=3
    )
    without = plan_input(InputSpec(uri=str(tmp_path)), images_per_prompt=3)

    assert with_column.planned_images == 2 + 3 + 1 + 5
    assert without.planned_images == 4 * 3


# ---------------------------------------------------------------------------------------
# Types every reader takes


def test_seed_column_values_from_2_63_up_are_error_rows_naming_the_column():
    spec = make_spec("out", input={"seed_column": "seed"}, generation={"seed": 7})
    seeds = pa.array([2**63 - 1, 2**63, 2**64 - 1, None], pa.uint64())
    out = ExpandImages(spec)(input_table({"prompt": pa.array(["a"] * 4), "seed": seeds}))

    assert out.schema.field(Col.SEED).type == pa.int64()
    assert out.column("status").to_pylist() == ["ok", "error", "error", "ok"]
    errors = out.column("error").to_pylist()
    assert errors[1] == f"seed column 'seed': seed {2**63} is outside 0 to 2**63-1"
    assert errors[2] == f"seed column 'seed': seed {2**64 - 1} is outside 0 to 2**63-1"
    seeds_out = out.column(Col.SEED).to_pylist()
    assert seeds_out[0] == 2**63 - 1 and seeds_out[3] == derived_seed(7, "part-0.parquet#3", 0)
    assert all(0 <= seed < 2**63 for seed in seeds_out)


def test_uint64_passthrough_becomes_int64_and_a_value_too_large_is_an_error_row():
    spec = make_spec("out", input={"passthrough_columns": ["big", "small", "nested"]})
    table = input_table(
        {
            "prompt": pa.array(["a", "b", "c"]),
            "big": pa.array([1, 2**63, None], pa.uint64()),
            "small": pa.array([0, 2**63 - 1, 5], pa.uint64()),
            "nested": pa.array([[1], [2], [2**64 - 1, 3]], pa.list_(pa.uint64())),
            "when": pa.array([0, 1, 2], pa.timestamp("ms")),
        }
    )

    out = ExpandImages(spec)(table)

    assert out.schema.field("big").type == pa.int64()
    assert out.schema.field("small").type == pa.int64()
    assert out.schema.field("nested").type == pa.list_(pa.int64())
    assert out.column("small").to_pylist() == [0, 2**63 - 1, 5]
    assert out.column("big").to_pylist() == [1, None, None]
    assert out.column("nested").to_pylist() == [[1], [2], None]
    assert out.column("status").to_pylist() == ["ok", "error", "error"]
    errors = out.column("error").to_pylist()
    assert errors[1].startswith(f"passthrough column 'big': value {2**63} does not fit")
    assert errors[2].startswith("passthrough column 'nested': value [18446744073709551615, 3]")


def test_timezone_naive_timestamp_passthrough_is_kept_as_it_is():
    spec = make_spec("out", input={"passthrough_columns": ["when"]})
    when = pa.array([0, 1], pa.timestamp("ms"))
    out = ExpandImages(spec)(input_table({"prompt": pa.array(["a", "b"]), "when": when}))
    assert out.schema.field("when").type == pa.timestamp("ms")
    assert out.column("when").to_pylist() == when.to_pylist()


def test_manifest_has_no_unsigned_64_bit_column_and_a_utc_generated_at():
    types = {field.name: field.type for field in MANIFEST_FIELDS}
    assert pa.uint64() not in types.values()
    assert types[Col.SEED] == pa.int64()
    assert types[Col.GENERATED_AT] == pa.timestamp("us", tz="UTC")


# ---------------------------------------------------------------------------------------
# Planning and the spec


@pytest.mark.parametrize("role", sorted(PARAMETER_COLUMNS))
def test_planning_refuses_a_missing_parameter_column_naming_file_and_column(role):
    spec = make_spec("out", input={role: "per_row"}).input
    with pytest.raises(InputError, match=rf"{FILE}: .*column 'per_row' is missing"):
        check_schema(pa.schema([("prompt", pa.string())]), spec, FILE)


@pytest.mark.parametrize("dtype", [pa.string(), pa.bool_(), pa.list_(pa.int64())])
def test_planning_refuses_a_parameter_column_that_is_not_numeric(dtype):
    spec = make_spec("out", input={"width_column": "w"}).input
    with pytest.raises(InputError, match=rf"{FILE}: width column 'w' has type .*expected a number"):
        check_schema(pa.schema([("prompt", pa.string()), ("w", dtype)]), spec, FILE)


@pytest.mark.parametrize(
    "dtype", [pa.int16(), pa.uint64(), pa.float32(), pa.decimal128(10, 2), pa.null()]
)
def test_planning_accepts_numeric_parameter_columns(dtype):
    spec = make_spec("out", input={"steps_column": "s"}).input
    check_schema(pa.schema([("prompt", pa.string()), ("s", dtype)]), spec, FILE)


@pytest.mark.parametrize("role", sorted(PARAMETER_COLUMNS))
def test_parameter_column_named_like_a_provenance_column_is_refused(role):
    with pytest.raises(SpecError, match=rf"input.{role}: 'row_index'"):
        make_spec("out", input={role: "row_index"})


def test_parameter_columns_enter_the_fingerprint_only_when_set():
    plain = make_spec("out")
    assert not set(PARAMETER_COLUMNS) & set(plain.fingerprint_fields())
    for role in PARAMETER_COLUMNS:
        spec = make_spec("out", input={role: "x"})
        assert spec.fingerprint_fields()[role] == "x"
        assert spec.fingerprint() != plain.fingerprint()


def test_only_model_and_format_are_spec_constants():
    spec = make_spec("out", generation={"steps": 3, "width": 128})
    assert spec.spec_constants() == {"model": "tiny", "image_format": "png"}
    assert spec.row_defaults() == {
        "steps": 3,
        "guidance_scale": spec.resolved_guidance_scale,
        "width": 128,
        "height": spec.generation.height,
    }


def test_an_output_of_another_job_file_format_refuses_to_resume(tmp_path):
    out_dir = tmp_path / "out"
    spec = make_spec(out_dir)
    storage = Storage(str(out_dir))
    claim_output(storage, spec)
    # _job.json as the version before wrote it (its manifests recorded no format, and its
    # seeds were 64-bit before that): same fingerprint, older format.
    job = json.loads((out_dir / "_job.json").read_text())
    job["format"] = JOB_FILE_FORMAT - 1
    (out_dir / "_job.json").write_text(json.dumps(job))

    with pytest.raises(
        OutputConflictError,
        match=rf"job-file format {JOB_FILE_FORMAT - 1}, this one resumes format {JOB_FILE_FORMAT}",
    ):
        claim_output(storage, spec)
    report = verify_output(str(out_dir))
    assert not report.ok
    assert any(f"job-file format {JOB_FILE_FORMAT - 1}" in p for p in report.problems)
