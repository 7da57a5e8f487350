"""The commit protocol's S3 half on moto's server: create-only claims (conditional PUTs)
and committed shards checked against a listing's sizes. No Ray."""

from __future__ import annotations

from koala_batch.output.commit import load_committed
from koala_batch.output.layout import list_output, tar_path
from koala_batch.stages.write import WriteShard
from koala_batch.storage import Storage
from tests.unit.conftest import encoded_table, make_spec, race, race_for_claim


def test_create_exclusive_is_a_conditional_put(s3_server, s3_bucket):
    storage = Storage(f"s3://{s3_bucket}/out", s3_server.storage_options)
    assert storage.create_exclusive("_job.json", b"mine") is True
    assert storage.create_exclusive("_job.json", b"theirs") is False
    assert storage.read_bytes("_job.json") == b"mine"
    assert storage.create_exclusive("_job.json", b"mine") is True  # its own retried write

    outcomes = race(
        lambda racer: storage.create_exclusive("race/_job.json", f"run{racer}".encode()), 6
    )
    assert outcomes.count(True) == 1, outcomes


def test_of_claims_racing_for_a_new_s3_output_exactly_one_creates_it(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/out"
    storage = Storage(url, s3_server.storage_options)
    spec = make_spec(url, output={"storage_options": s3_server.storage_options})
    outcomes = race_for_claim(storage, spec, racers=4)
    assert outcomes.count("created") == 1, outcomes


def test_a_listing_raced_by_a_new_object_holds_no_directory_entry(
    s3_server, s3_bucket, monkeypatch
):
    # The race behind a claim once refused for "files koala-batch did not write (.)": s3fs
    # lists the prefix (nothing yet), another run's object lands, and s3fs's fallback
    # info on the prefix itself finds it a directory.
    storage = Storage(f"s3://{s3_bucket}/out", s3_server.storage_options)
    storage.write_bytes("_job.json.0123abcd.partial", b"{}")  # the other run's probe
    lsdir = storage.fs._lsdir

    async def empty_first(path, *args, **kwargs):
        monkeypatch.setattr(storage.fs, "_lsdir", lsdir)
        return []

    monkeypatch.setattr(storage.fs, "_lsdir", empty_first)

    listing = list_output(storage)

    assert storage.fs._lsdir is lsdir, "the race was not staged: s3fs listed otherwise"
    assert listing.files == () and listing.foreign == ()


def test_damaged_shards_are_found_from_the_s3_listing(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/out"
    storage = Storage(url, s3_server.storage_options)
    spec = make_spec(url, output={"storage_options": s3_server.storage_options})
    writer = WriteShard(spec)
    good = writer(encoded_table(spec, ["a", "b"])).column("shard")[0].as_py()
    cut = writer(encoded_table(spec, ["c"], first_ordinal=2)).column("shard")[0].as_py()
    data = storage.read_bytes(tar_path(cut))
    storage.write_bytes(tar_path(cut), data[:1024])

    state = load_committed(storage)

    assert set(state.shards) == {good}
    assert state.damaged == {cut: f"its tar has 1024 bytes, its manifest records {len(data)}"}
