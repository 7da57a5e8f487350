"""Keys, seeds and shard names: pure functions of the job seed, the row id and the image index."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from koala_batch.keys import (
    SEED_MODULUS,
    derived_row_id,
    derived_seed,
    image_seed,
    sample_key,
    shard_name,
)

KEY_PATTERN = re.compile(r"^[0-9a-f]{32}-[0-9]+$")


# ---------------------------------------------------------------------------------------
# sample_key


@pytest.mark.parametrize(
    "row_id",
    [
        "row-1",
        "",
        "a/b/../c.png",
        "日本語 prompt id",
        "x" * 5000,
        "s3://bucket/file.parquet#12",
        "\ud800lone-surrogate",
    ],
)
def test_sample_key_is_hex_dash_index(row_id):
    key = sample_key(row_id, 7)
    assert KEY_PATTERN.match(key), key
    assert key.endswith("-7")
    assert key.count("-") == 1
    assert "." not in key and "/" not in key  # safe file name, webdataset splits at the dot


def test_sample_key_is_stable_across_runs_and_versions():
    # Pinned: a change here orphans every committed output (resume would redo everything).
    assert sample_key("row-1", 0) == "0f719b1f3a428a4dd53c61b3bdc5c2ec-0"
    assert sample_key("row-1", 3) == "0f719b1f3a428a4dd53c61b3bdc5c2ec-3"
    assert sample_key("row-1", 0) == sample_key("row-1", 0)


def test_sample_key_differs_per_id_and_per_index():
    keys = {sample_key(f"row-{i}", k) for i in range(200) for k in range(3)}
    assert len(keys) == 600
    assert sample_key("row-1", 0) != sample_key("row-1", 1)
    assert sample_key("row-1", 0) != sample_key("row-2", 0)


def test_sample_key_never_contains_the_raw_id():
    for row_id in ["customer-4711-private", "deadbeef", "0f719b1f3a428a4d"]:
        assert row_id not in sample_key(row_id, 0)


def test_derived_row_id_names_the_file_and_row():
    assert derived_row_id("part-0.parquet", 12) == "part-0.parquet#12"
    assert derived_row_id("a.parquet", 1) != derived_row_id("b.parquet", 1)


# ---------------------------------------------------------------------------------------
# Seeds


def test_seed_range_is_what_every_reader_takes():
    assert SEED_MODULUS == 2**63


def test_derived_seed_is_pinned_and_in_int63_range():
    assert derived_seed(7, "row-1", 0) == 3739844742471612813
    # sha256 gives 13370374066692190539 (top bit set) here: the top bit is dropped.
    assert derived_seed(7, "row-0", 0) == 13370374066692190539 - 2**63
    seeds = [
        derived_seed(s, f"id-{i}", k)
        for s in (0, 1, 2**63 - 1)
        for i in range(50)
        for k in range(2)
    ]
    assert all(0 <= seed < SEED_MODULUS for seed in seeds)
    assert len(set(seeds)) == len(seeds)


def test_derived_seed_depends_on_each_input():
    base = derived_seed(7, "row-1", 0)
    assert derived_seed(8, "row-1", 0) != base
    assert derived_seed(7, "row-2", 0) != base
    assert derived_seed(7, "row-1", 1) != base


def test_derived_seed_fields_do_not_run_together():
    # (1, "23", 0) and (12, "3", 0) must not hash the same material.
    assert derived_seed(1, "23", 0) != derived_seed(12, "3", 0)
    assert derived_seed(7, "a", 10) != derived_seed(7, "a1", 0)


def test_image_seed_without_row_seed_is_the_derived_seed():
    for k in range(3):
        assert image_seed(None, 7, "row-1", k) == derived_seed(7, "row-1", k)


def test_image_seed_with_row_seed_is_seed_plus_index_whatever_the_job_seed():
    assert [image_seed(100, 7, "row-1", k) for k in range(3)] == [100, 101, 102]
    assert image_seed(100, 0, "other-id", 2) == 102
    assert image_seed(0, 7, "row-1", 0) == 0  # zero is a seed, not "no seed"


def test_image_seed_wraps_modulo_2_63():
    top = 2**63 - 1
    assert image_seed(top, 7, "row-1", 0) == top
    assert image_seed(top, 7, "row-1", 1) == 0
    assert image_seed(top - 1, 7, "row-1", 5) == 3


@settings(max_examples=300, deadline=None)
@given(
    job_seed=st.integers(0, 2**63 - 1),
    row_id=st.text(max_size=40),
    image_index=st.integers(0, 999),
    row_seed=st.none() | st.integers(0, 2**63 - 1),
)
def test_every_seed_fits_a_signed_64_bit_integer(job_seed, row_id, image_index, row_seed):
    seed = image_seed(row_seed, job_seed, row_id, image_index)
    assert 0 <= seed < 2**63


def test_seeds_do_not_depend_on_call_order():
    requests = [(s, f"id-{i}", k) for s in (0, 5) for i in range(20) for k in range(2)]
    first = {r: derived_seed(*r) for r in requests}
    shuffled = requests[:]
    random.Random(3).shuffle(shuffled)
    assert {r: derived_seed(*r) for r in shuffled} == first


# ---------------------------------------------------------------------------------------
# shard_name


def test_shard_name_is_ordinal_then_hash():
    name = shard_name(42, ["b", "a"])
    assert name == "000000000042-7e18f737"
    assert re.match(r"^\d{12}-[0-9a-f]{8}$", name)


def test_shard_name_does_not_depend_on_key_order():
    keys = [sample_key(f"row-{i}", 0) for i in range(50)]
    shuffled = keys[:]
    random.Random(1).shuffle(shuffled)
    assert shard_name(0, keys) == shard_name(0, shuffled)


def test_shard_name_depends_on_the_keys_and_the_ordinal():
    keys = [sample_key(f"row-{i}", 0) for i in range(5)]
    assert shard_name(0, keys) != shard_name(0, keys[:-1])
    assert shard_name(0, keys) != shard_name(5, keys)
    assert shard_name(0, keys).split("-")[1] == shard_name(5, keys).split("-")[1]


def test_shard_names_sort_by_first_ordinal():
    names = [shard_name(ordinal, [str(ordinal)]) for ordinal in (5, 1000, 20, 3_000_000)]
    assert sorted(names) == [shard_name(o, [str(o)]) for o in (5, 20, 1000, 3_000_000)]


def test_key_set_membership_matches_a_python_set():
    from koala_batch.keys import KeySet

    members = [sample_key(f"row-{i}", i % 3) for i in range(500)]
    others = [sample_key(f"row-{i}", 3) for i in range(500)] + [sample_key("x", 0)]
    keys = KeySet.from_keys(members + members[:10])  # repeats collapse
    assert len(keys) == 500
    assert keys.contains_many(members).all()
    assert not keys.contains_many(others).any()
    assert members[7] in keys and others[7] not in keys
    assert not KeySet().contains_many(members).any() and len(KeySet()) == 0
