"""Validation: row problems become error rows naming the reason; one work row per image."""

from __future__ import annotations

from decimal import Decimal

import pyarrow as pa
import pytest

from koala_batch.inputs.files import check_schema
from koala_batch.inputs.rows import parse_row_seed
from koala_batch.keys import SEED_MODULUS, derived_row_id, derived_seed, sample_key
from koala_batch.stages.expand import ExpandImages
from tests.unit.conftest import make_spec

FILE = "s3://bucket/prompts/part-0.parquet"


def input_spec(**fields):
    return make_spec("out", input=fields).input


def schema(**columns) -> pa.Schema:
    return pa.schema([pa.field(name, dtype) for name, dtype in columns.items()])


# ---------------------------------------------------------------------------------------
# parse_row_seed


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (float("nan"), None),
        (0, 0),
        (5, 5),
        (5.0, 5),
        (Decimal("5"), 5),
        (SEED_MODULUS - 1, SEED_MODULUS - 1),
    ],
)
def test_usable_seeds(value, expected):
    assert parse_row_seed(value) == (expected, None)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (5.5, "not a whole number"),
        (-1, "seed -1 is outside 0 to 2**63-1"),
        (-0.5, ""),
        (SEED_MODULUS, f"seed {2**63} is outside 0 to 2**63-1"),
        (2**64 - 1, "outside 0 to 2**63-1"),
        (float(SEED_MODULUS), "outside 0 to 2**63-1"),
        (float("inf"), ""),
        ("12", ""),
    ],
)
def test_unusable_seeds_give_a_reason(value, reason):
    seed, problem = parse_row_seed(value)
    assert seed is None
    assert problem is not None and reason in problem


def test_fractional_decimal_seed_is_not_truncated():
    seed, problem = parse_row_seed(Decimal("5.5"))
    assert seed is None
    assert problem is not None and "whole number" in problem


# ---------------------------------------------------------------------------------------
# ExpandImages


def input_table(
    rows: list[dict], types: dict[str, pa.DataType] | None = None, first_ordinal: int = 10
) -> pa.Table:
    """What the read stage emits: provenance columns plus the input columns."""
    types = types or {}
    columns: dict[str, pa.Array] = {
        "source": pa.array(["part-0.parquet"] * len(rows), pa.string()),
        "row_index": pa.array(range(len(rows)), pa.int64()),
        "row_ordinal": pa.array(range(first_ordinal, first_ordinal + len(rows)), pa.int64()),
    }
    for name in rows[0]:
        columns[name] = pa.array([row[name] for row in rows], types.get(name, pa.string()))
    return pa.table(columns)


ROWS = [
    {"id": "a", "prompt": "a cat", "seed": None, "neg": "blurry", "category": "animals"},
    {"id": "b", "prompt": "", "seed": 5, "neg": None, "category": "empty"},
    {"id": "c", "prompt": "   \t\n", "seed": 7, "neg": None, "category": "blank"},
    {"id": "d", "prompt": None, "seed": None, "neg": None, "category": "null"},
    {"id": "e", "prompt": "a dog", "seed": SEED_MODULUS - 1, "neg": None, "category": "wrap"},
]
TYPES = {"seed": pa.uint64()}


def expand_spec(images_per_prompt: int = 2, **input_fields):
    fields = {
        "id_column": "id",
        "seed_column": "seed",
        "negative_prompt_column": "neg",
        "passthrough_columns": ["category"],
        **input_fields,
    }
    return make_spec(
        "out",
        input=fields,
        generation={
            "images_per_prompt": images_per_prompt,
            "negative_prompt": "default-neg",
            "seed": 7,
        },
    )


def test_expand_gives_images_per_prompt_rows_per_input_row():
    out = ExpandImages(expand_spec())(input_table(ROWS, TYPES))

    assert out.num_rows == len(ROWS) * 2
    assert out.column("id").to_pylist() == ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e"]
    assert out.column("image_index").to_pylist() == [0, 1] * 5
    assert out.column("key").to_pylist() == [
        sample_key(row["id"], k) for row in ROWS for k in range(2)
    ]
    # row_ordinal 10..14, two images each: ordinal = row_ordinal * 2 + k
    assert out.column("ordinal").to_pylist() == list(range(20, 30))
    assert out.column("row_index").to_pylist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert out.column("source").to_pylist() == ["part-0.parquet"] * 10


def test_expand_output_types():
    out = ExpandImages(expand_spec())(input_table(ROWS, TYPES))
    assert out.schema.field("seed").type == pa.int64()
    assert out.schema.field("image_index").type == pa.int32()
    assert out.schema.field("ordinal").type == pa.int64()
    assert out.schema.field("row_index").type == pa.int64()
    assert out.schema.field("key").type == pa.string()


def test_expand_seeds_row_seed_plus_index_else_derived():
    out = ExpandImages(expand_spec())(input_table(ROWS, TYPES))
    seeds = out.column("seed").to_pylist()

    assert seeds[0:2] == [derived_seed(7, "a", 0), derived_seed(7, "a", 1)]
    assert seeds[2:4] == [5, 6]
    assert seeds[6:8] == [derived_seed(7, "d", 0), derived_seed(7, "d", 1)]
    assert seeds[8:10] == [SEED_MODULUS - 1, 0]  # wraps mod 2**63


def test_bad_prompts_become_error_rows_with_a_reason():
    out = ExpandImages(expand_spec())(input_table(ROWS, TYPES))
    statuses = out.column("status").to_pylist()
    errors = out.column("error").to_pylist()

    assert statuses == [
        "ok",
        "ok",
        "error",
        "error",
        "error",
        "error",
        "error",
        "error",
        "ok",
        "ok",
    ]
    assert errors[0] is None and errors[8] is None
    assert "empty" in errors[2] and errors[2] == errors[3]
    assert "empty or whitespace" in errors[4]
    assert "null" in errors[6]


def test_negative_prompt_falls_back_to_the_job_default():
    out = ExpandImages(expand_spec())(input_table(ROWS, TYPES))
    assert out.column("negative_prompt").to_pylist()[::2] == [
        "blurry",
        "default-neg",
        "default-neg",
        "default-neg",
        "default-neg",
    ]


def test_prompts_are_carried_unchanged():
    out = ExpandImages(expand_spec())(input_table(ROWS, TYPES))
    assert out.column("prompt").to_pylist()[::2] == [row["prompt"] for row in ROWS]


def test_passthrough_columns_follow_their_rows():
    out = ExpandImages(expand_spec())(input_table(ROWS, TYPES))
    assert out.column("category").to_pylist() == [row["category"] for row in ROWS for _ in range(2)]


def test_committed_keys_are_skipped_and_passthrough_stays_aligned():
    committed = frozenset({sample_key("a", 0), sample_key("c", 1), sample_key("e", 0)})
    out = ExpandImages(expand_spec(), committed)(input_table(ROWS, TYPES))

    pairs = list(
        zip(out.column("id").to_pylist(), out.column("image_index").to_pylist(), strict=True)
    )
    assert pairs == [("a", 1), ("b", 0), ("b", 1), ("c", 0), ("d", 0), ("d", 1), ("e", 1)]
    assert not committed & set(out.column("key").to_pylist())
    assert out.column("category").to_pylist() == [
        "animals",
        "empty",
        "empty",
        "blank",
        "null",
        "null",
        "wrap",
    ]
    assert out.column("ordinal").to_pylist() == [21, 22, 23, 24, 26, 27, 29]
    assert out.column("seed").to_pylist()[-1] == 0


def test_everything_committed_gives_an_empty_table_with_the_columns():
    spec = expand_spec()
    committed = frozenset(sample_key(row["id"], k) for row in ROWS for k in range(2))
    out = ExpandImages(spec, committed)(input_table(ROWS, TYPES))
    assert out.num_rows == 0
    assert {"key", "seed", "status", "error", "category"} <= set(out.column_names)


def test_rows_without_id_column_get_file_and_row_derived_ids():
    spec = make_spec("out", generation={"images_per_prompt": 1, "seed": 7})
    table = input_table([{"prompt": "x"}, {"prompt": "y"}])
    out = ExpandImages(spec)(table)
    assert out.column("id").to_pylist() == [
        derived_row_id("part-0.parquet", 0),
        derived_row_id("part-0.parquet", 1),
    ]
    assert out.column("key").to_pylist()[1] == sample_key("part-0.parquet#1", 0)
    assert out.column("seed").to_pylist()[0] == derived_seed(7, "part-0.parquet#0", 0)


def test_integer_ids_are_used_as_text():
    spec = make_spec("out", input={"id_column": "id"})
    table = input_table([{"id": 42, "prompt": "x"}], {"id": pa.int64()})
    out = ExpandImages(spec)(table)
    assert out.column("id").to_pylist() == ["42"]
    assert out.column("key").to_pylist() == [sample_key("42", 0)]


def test_null_id_is_an_error_row():
    spec = make_spec("out", input={"id_column": "id"})
    out = ExpandImages(spec)(
        input_table([{"id": None, "prompt": "x"}, {"id": "ok", "prompt": "y"}])
    )
    assert out.column("status").to_pylist() == ["error", "ok"]
    assert "id column 'id' is null" in out.column("error").to_pylist()[0]


def test_bad_row_seeds_are_error_rows_and_reasons_combine():
    spec = make_spec("out", input={"seed_column": "seed"})
    rows = [
        {"prompt": "x", "seed": -1.0},
        {"prompt": "y", "seed": 5.5},
        {"prompt": "", "seed": -3.0},
        {"prompt": "z", "seed": 3.0},
    ]
    out = ExpandImages(spec)(input_table(rows, {"seed": pa.float64()}))

    assert out.column("status").to_pylist() == ["error", "error", "error", "ok"]
    errors = out.column("error").to_pylist()
    assert errors[0] == "seed column 'seed': seed -1 is outside 0 to 2**63-1"
    assert "whole number" in errors[1] and "seed column 'seed'" in errors[1]
    assert "empty" in errors[2] and "outside 0 to 2**63-1" in errors[2]
    assert out.column("seed").to_pylist()[3] == 3


def test_expand_is_independent_of_how_rows_are_batched():
    spec = expand_spec()
    table = input_table(ROWS, TYPES)
    whole = ExpandImages(spec)(table)
    parts = pa.concat_tables(
        [ExpandImages(spec)(table.slice(0, 2)), ExpandImages(spec)(table.slice(2))]
    )
    assert parts.equals(whole)


def test_dictionary_encoded_prompt_column_is_accepted():
    spec = make_spec("out")
    prompts = pa.array(["a cat", "a dog", "a cat"]).dictionary_encode()
    table = pa.table(
        {
            "source": pa.array(["part-0.parquet"] * 3),
            "row_index": pa.array([0, 1, 2], pa.int64()),
            "row_ordinal": pa.array([0, 1, 2], pa.int64()),
            "prompt": prompts,
        }
    )
    # The stage itself copes: dictionary values read back as plain strings.
    out = ExpandImages(spec)(table)
    assert out.column("prompt").to_pylist() == ["a cat", "a dog", "a cat"]
    assert out.column("status").to_pylist() == ["ok"] * 3

    check_schema(pa.schema([pa.field("prompt", prompts.type)]), spec.input, FILE)


# ---------------------------------------------------------------------------------------
# text that is not valid UTF-8 (issue 8, case 5)


def not_utf8(values: list[bytes | None], text_type: pa.DataType | None = None) -> pa.Array:
    """A string column holding these bytes as they are, as a Parquet file can: neither
    pyarrow's writer nor its reader checks them."""
    text_type = text_type or pa.string()
    binary = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary()}[text_type]
    return pa.array(values, binary).view(text_type)


def provenance(count: int) -> dict[str, pa.Array]:
    return {
        "source": pa.array(["part-0.parquet"] * count),
        "row_index": pa.array(range(count), pa.int64()),
        "row_ordinal": pa.array(range(count), pa.int64()),
    }


@pytest.mark.parametrize("text_type", [pa.string(), pa.large_string()])
def test_prompt_that_is_not_utf8_is_an_error_row_naming_the_column(text_type):
    prompts = not_utf8([b"a cat", b"caf\xe9 au lait", None, b"a dog"], text_type)
    table = pa.table({**provenance(4), "prompt": prompts})

    out = ExpandImages(make_spec("out"))(table)

    assert out.column("status").to_pylist() == ["ok", "error", "error", "ok"]
    assert out.column("error").to_pylist()[1] == (
        "prompt column 'prompt': byte 0xe9 at offset 3 is not valid UTF-8"
    )
    assert out.column("error").to_pylist()[2] == "prompt is null"
    # The manifest keeps the bytes readable (escaped), and stays valid UTF-8 itself.
    assert out.column("prompt").to_pylist() == ["a cat", "caf\\xe9 au lait", None, "a dog"]
    out.validate(full=True)


def test_dictionary_encoded_prompt_that_is_not_utf8_is_an_error_row():
    prompts = not_utf8([b"ok", b"\xff", b"ok"]).dictionary_encode()
    table = pa.table({**provenance(3), "prompt": prompts})
    out = ExpandImages(make_spec("out"))(table)
    assert out.column("status").to_pylist() == ["ok", "error", "ok"]
    assert "byte 0xff at offset 0" in out.column("error").to_pylist()[1]


def test_negative_prompt_and_passthrough_that_are_not_utf8_are_error_rows():
    spec = make_spec(
        "out",
        input={"negative_prompt_column": "neg", "passthrough_columns": ["note", "n"]},
    )
    table = pa.table(
        {
            **provenance(3),
            "prompt": ["a cat", "a dog", "a fox"],
            "neg": not_utf8([b"blurry", b"bad \xc3(", None]),
            "note": not_utf8([b"fine", b"fine", b"\x80 note"]),
            "n": pa.array([1, 2, 3]),
        }
    )

    out = ExpandImages(spec)(table)

    assert out.column("status").to_pylist() == ["ok", "error", "error"]
    errors = out.column("error").to_pylist()
    assert errors[1] == "negative prompt column 'neg': byte 0xc3 at offset 4 is not valid UTF-8"
    assert errors[2] == "passthrough column 'note': byte 0x80 at offset 0 is not valid UTF-8"
    assert out.column("note").to_pylist() == ["fine", "fine", "\\x80 note"]
    assert out.column("note").type == pa.string()
    assert out.column("n").to_pylist() == [1, 2, 3]
    out.validate(full=True)


def test_valid_text_is_not_rebuilt():
    spec = make_spec("out", input={"passthrough_columns": ["note"]})
    note = pa.array(["x", "y"]).dictionary_encode()
    table = pa.table({**provenance(2), "prompt": ["a", "b"], "note": note})
    out = ExpandImages(spec)(table)
    assert out.column("note").type == note.type
    assert out.column("status").to_pylist() == ["ok", "ok"]


def test_id_that_is_not_utf8_is_an_error_row_under_a_derived_id():
    # Planning refuses such ids; the stage itself never makes an id of escaped bytes.
    spec = make_spec("out", input={"id_column": "id"}, generation={"images_per_prompt": 1})
    table = pa.table({**provenance(2), "prompt": ["a", "b"], "id": not_utf8([b"x", b"y\xff"])})
    out = ExpandImages(spec)(table)
    assert out.column("id").to_pylist() == ["x", derived_row_id("part-0.parquet", 1)]
    assert out.column("error").to_pylist() == [
        None,
        "id column 'id': byte 0xff at offset 1 is not valid UTF-8",
    ]
