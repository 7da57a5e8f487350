"""Keys, seeds and shard names: pure functions of the job seed, the row id and the image index."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from koala_batch.keys import (
    SEED_MODULUS,
    KeySet,
    derived_row_id,
    derived_seed,
    image_seed,
    made_from_digest,
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


def rows_of(keys: list[str], status: str = "ok") -> list[tuple[str, str, str]]:
    return [(key, status, made_from_digest(key, None, 1, 2, 5.0, 64, 64)) for key in keys]


def test_shard_name_is_ordinal_then_hash():
    name = shard_name(42, [("b", "ok", "00"), ("a", "error", "11")])
    assert name == "000000000042-18135f1f"
    assert re.match(r"^\d{12}-[0-9a-f]{8}$", name)


def test_shard_name_does_not_depend_on_row_order():
    rows = rows_of([sample_key(f"row-{i}", 0) for i in range(50)])
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert shard_name(0, rows) == shard_name(0, shuffled)


def test_shard_name_depends_on_the_rows_and_the_ordinal():
    rows = rows_of([sample_key(f"row-{i}", 0) for i in range(5)])
    assert shard_name(0, rows) != shard_name(0, rows[:-1])
    assert shard_name(0, rows) != shard_name(5, rows)
    assert shard_name(0, rows).split("-")[1] == shard_name(5, rows).split("-")[1]


def test_a_retry_with_another_outcome_or_row_gets_another_shard_name():
    """What keeps a retry's new shard of the same keys from being taken for the old one."""
    keys = [sample_key(f"row-{i}", 0) for i in range(3)]
    failed = rows_of(keys, "error")
    assert shard_name(0, rows_of(keys, "ok")) != shard_name(0, failed)
    changed = [
        (key, status, "ff" * 16) if key == keys[1] else (key, status, made)
        for key, status, made in failed
    ]
    assert shard_name(0, changed) != shard_name(0, failed)
    assert shard_name(0, rows_of(keys, "error")) == shard_name(0, failed)


def test_shard_names_sort_by_first_ordinal():
    names = [shard_name(ordinal, rows_of([str(ordinal)])) for ordinal in (5, 1000, 20, 3_000_000)]
    assert sorted(names) == [shard_name(o, rows_of([str(o)])) for o in (5, 20, 1000, 3_000_000)]


# ---------------------------------------------------------------------------------------
# made_from_digest


def test_made_from_changes_with_each_thing_the_image_is_made_from():
    base = ("a fox", "blurry", 7, 4, 5.0, 64, 64)
    digest = made_from_digest(*base)
    assert re.fullmatch(r"[0-9a-f]{32}", digest) and made_from_digest(*base) == digest
    for position, other in enumerate(["a dog", None, 8, 5, 5.5, 72, 72]):
        changed = list(base)
        changed[position] = other
        assert made_from_digest(*changed) != digest, position
    # An integral guidance scale read as an int is the same request as the float.
    assert made_from_digest("a fox", "blurry", 7, 4, 5, 64, 64) == digest


def test_made_from_fields_do_not_run_together():
    assert made_from_digest("a", "b c", 1, 1, 1.0, 8, 8) != made_from_digest(
        "a b", "c", 1, 1, 1.0, 8, 8
    )
    assert made_from_digest("", None, 1, 1, 1.0, 8, 8) != made_from_digest(
        None, "", 1, 1, 1.0, 8, 8
    )


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


def key_set(pairs: dict[str, str]) -> KeySet:
    return KeySet.from_keys(
        list(pairs), [made_from_digest(p, None, 1, 1, 1.0, 8, 8) for p in pairs.values()]
    )


def test_key_set_difference_union_and_overlap_match_python_sets():
    rng = random.Random(3)
    left = {sample_key(f"row-{i}", 0) for i in rng.sample(range(300), 150)}
    right = {sample_key(f"row-{i}", 0) for i in rng.sample(range(300), 150)}
    a, b = KeySet.from_keys(sorted(left)), KeySet.from_keys(sorted(right))
    assert a.overlap(b) == len(left & right)
    difference = a.difference(b)
    assert len(difference) == len(left - right)
    assert difference.contains_many(sorted(left - right)).all()
    assert not difference.contains_many(sorted(left & right)).any()
    assert len(a.union(b)) == len(left | right)
    assert len(KeySet().difference(a)) == 0 and len(a.difference(KeySet())) == len(a)


def test_key_set_changed_finds_the_keys_made_from_something_else():
    committed = key_set({"k1": "a fox", "k2": "a dog", "k3": "a cat", "gone": "an owl"})
    planned = key_set({"k1": "a fox", "k2": "a wolf", "k3": "a cat", "new": "a bee"})
    changed = committed.changed(planned)
    assert len(changed) == 1 and "k2" in changed
    # It keeps the committed side's digest; the other order keeps the planned one.
    dog = bytes.fromhex(made_from_digest("a dog", None, 1, 1, 1.0, 8, 8))
    assert changed.made_from.tolist() == [dog]
    assert "k2" in planned.changed(committed)
    assert len(committed.changed(KeySet.from_keys(["k2"]))) == 0  # no digests: nothing known
    assert len(committed.difference(planned)) == 1 and "gone" in committed.difference(planned)
