"""Property: whatever the ids, every key and every output path stays under the output prefix."""

from __future__ import annotations

import posixpath
import re

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from koala_batch.errors import StorageError
from koala_batch.keys import sample_key, shard_name
from koala_batch.output.layout import manifest_path, tar_path
from koala_batch.spec import spec_from_dict
from koala_batch.stages.expand import ExpandImages
from koala_batch.storage import Storage
from tests.conftest import tiny_spec

KEY = re.compile(r"^[0-9a-f]{32}-[0-9]+$")

hostile_ids = st.one_of(
    st.text(min_size=0, max_size=200),
    st.text(alphabet="./\\\x00~$:*?", min_size=1, max_size=50),
    st.builds(
        lambda n, s: s * n, st.integers(1, 10_000), st.sampled_from(["../", "/", "\x00", "é"])
    ),
    st.sampled_from(["..", ".", "/", "../../etc/passwd", "C:\\Windows", "a/../../b", "\x00"]),
)


@settings(max_examples=300, deadline=None)
@given(row_id=hostile_ids, image_index=st.integers(0, 10_000), ordinal=st.integers(0, 10**11))
def test_keys_and_paths_stay_under_the_prefix(tmp_path_factory, row_id, image_index, ordinal):
    key = sample_key(row_id, image_index)
    assert KEY.match(key), key
    shard = shard_name(ordinal, [key])
    storage = Storage(str(tmp_path_factory.getbasetemp() / "out"))
    for relative in (tar_path(shard), manifest_path(shard), f"shards/{key}.png"):
        path = storage.path(relative)
        assert path.startswith(storage.root + "/")
        assert posixpath.normpath(path) == path


@settings(max_examples=200, deadline=None)
@given(relative=st.text(alphabet="ab./\\\x00", min_size=0, max_size=30))
def test_storage_never_resolves_outside_its_root(tmp_path_factory, relative):
    storage = Storage(str(tmp_path_factory.getbasetemp() / "root"))
    try:
        path = storage.path(relative)
    except StorageError:
        return
    assert path == storage.root or path.startswith(storage.root + "/")


@settings(max_examples=50, deadline=None)
@given(ids=st.lists(hostile_ids, min_size=1, max_size=8, unique=True))
def test_expand_images_keys_are_safe_and_unique(ids):
    spec = spec_from_dict(
        tiny_spec(
            "in.parquet", "out", input={"id_column": "id"}, generation={"images_per_prompt": 2}
        )
    )
    table = pa.table(
        {
            "source": ["in.parquet"] * len(ids),
            "row_index": list(range(len(ids))),
            "row_ordinal": list(range(len(ids))),
            "prompt": ["a cat"] * len(ids),
            "id": ids,
        }
    )
    out = ExpandImages(spec)(table)
    keys = out.column("key").to_pylist()
    assert len(keys) == 2 * len(ids) == len(set(keys))
    assert all(KEY.match(key) for key in keys)
    assert out.column("id").to_pylist() == [i for i in ids for _ in range(2)]
