"""The generation stage in-process (no Ray): the tiny model, encoding inside the actor."""

from __future__ import annotations

import hashlib
import io
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from koala_batch.generate import GenerateImages
from koala_batch.schemas import GENERATED_FIELDS, STATUS_ERROR, STATUS_OK, Col
from koala_batch.validate import ExpandImages
from tests.unit.conftest import make_spec


@pytest.fixture(scope="module")
def spec(model_cache):
    return make_spec("out", output={"image_format": "png"})


@pytest.fixture(scope="module")
def generator(spec):
    return GenerateImages(spec, torch_threads=1)


def work_rows(spec, prompts: list[str | None]) -> pa.Table:
    count = len(prompts)
    table = pa.table(
        {
            Col.SOURCE: ["prompts.parquet"] * count,
            Col.ROW_INDEX: pa.array(range(count), pa.int64()),
            Col.ROW_ORDINAL: pa.array(range(count), pa.int64()),
            "prompt": pa.array(prompts, pa.string()),
        }
    )
    return ExpandImages(spec)(table)


def test_generated_rows_carry_encoded_images(spec, generator):
    before = time.time()
    out = generator(work_rows(spec, ["a red cube", None, "a blue ball"]))

    assert out.schema.names[: len(GENERATED_FIELDS)] == [f.name for f in GENERATED_FIELDS]
    for field in GENERATED_FIELDS:
        assert out.schema.field(field.name).type == field.type, field.name
    statuses = out.column(Col.STATUS).to_pylist()
    assert statuses == [STATUS_OK, STATUS_ERROR, STATUS_OK]
    images = out.column(Col.IMAGE).to_pylist()
    digests = out.column(Col.SHA256).to_pylist()
    sizes = out.column(Col.BYTES).to_pylist()
    for row in (0, 2):
        decoded = Image.open(io.BytesIO(images[row]))
        assert decoded.format == "PNG" and decoded.size == (64, 64)
        assert digests[row] == hashlib.sha256(images[row]).hexdigest()
        assert sizes[row] == len(images[row])
    assert images[1] is None and digests[1] is None and sizes[1] == 0
    assert images[0] != images[2]
    moments = out.column(Col.GENERATED_AT).to_pylist()
    assert all(before <= moment <= time.time() for moment in moments)


def test_encoded_image_is_the_pipeline_output_as_uint8(spec, generator):
    table = work_rows(spec, ["a lighthouse at dusk"])
    seed = table.column(Col.SEED).to_pylist()[0]
    expected = generator.run_pipeline(["a lighthouse at dusk"], None, [seed])[0]

    data = generator(table).column(Col.IMAGE).to_pylist()[0]

    decoded = np.asarray(Image.open(io.BytesIO(data)))
    assert np.array_equal(decoded, (expected * 255).round().astype(np.uint8))


def test_two_concurrent_calls_give_the_same_images_as_one_at_a_time(spec, generator):
    # The actor runs two calls at once (one generating, one encoding): the pipeline lock
    # keeps them from sharing the pipeline, so the bytes match sequential calls.
    tables = [work_rows(spec, [f"prompt {i}", f"other {i}"]) for i in range(2)]
    sequential = [generator(table).column(Col.IMAGE).to_pylist() for table in tables]
    concurrent: dict[int, list] = {}

    def call(index: int) -> None:
        concurrent[index] = generator(tables[index]).column(Col.IMAGE).to_pylist()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [concurrent[0], concurrent[1]] == sequential
