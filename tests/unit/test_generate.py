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

from koala_batch.schemas import GENERATED_FIELDS, STATUS_ERROR, STATUS_OK, Col
from koala_batch.stages.expand import ExpandImages
from koala_batch.stages.generate import GeneratedImages, GenerateImages, decode_latents, to_uint8
from koala_batch.stages.statistics import busy_summary
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
    expected = generator.run_pipeline(["a lighthouse at dusk"], None, [seed])

    data = generator(table).column(Col.IMAGE).to_pylist()[0]

    decoded = np.asarray(Image.open(io.BytesIO(data)))
    assert expected.pixels.dtype == np.uint8 and expected.finite.tolist() == [True]
    assert np.array_equal(decoded, expected.pixels[0])


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


def test_uint8_path_gives_the_bytes_of_diffusers_own_float_output(generator):
    # The generator decodes latents itself and converts to uint8 on the device; in
    # float32 that must be bit for bit diffusers' decode, "np" output and rounding.
    import torch

    pipeline = generator.pipeline
    arguments = dict(
        prompt=["a lighthouse at dusk", "a red cube"],
        num_inference_steps=2,
        guidance_scale=5.0,
        width=64,
        height=64,
    )
    with torch.inference_mode():
        latents = pipeline(
            **arguments,
            generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
            output_type="latent",
        ).images
        ours = decode_latents(pipeline, latents)
        theirs = pipeline(
            **arguments,
            generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
            output_type="np",
        ).images

    assert ours.pixels.dtype == np.uint8 and ours.pixels.shape == (2, 64, 64, 3)
    assert ours.finite.tolist() == [True, True]
    assert np.array_equal(ours.pixels, to_uint8(np.asarray(theirs)))


def test_non_finite_decoder_output_is_flagged_not_turned_into_pixels(generator):
    import torch

    latents = torch.zeros(2, 4, 8, 8)
    latents[1, 0, 3, 3] = float("nan")
    with torch.inference_mode():
        images = decode_latents(generator.pipeline, latents)

    assert images.finite.tolist() == [True, False]


def test_from_float_flags_nan_images_and_rounds_like_diffusers():
    images = np.stack([np.full((2, 2, 3), 0.5, np.float32), np.full((2, 2, 3), np.nan, np.float32)])

    converted = GeneratedImages.from_float(images)

    assert converted.finite.tolist() == [True, False]
    assert converted.pixels.dtype == np.uint8
    assert (converted.pixels[0] == 128).all()  # 127.5 rounds half to even, as numpy does


def test_a_nan_image_becomes_an_error_row_and_its_batch_neighbour_survives(spec):
    class HalfNaN(GenerateImages):
        def load_model(self, spec):
            return None

        def run_pipeline(self, prompts, negative_prompts, seeds, **pipeline_kwargs):
            images = np.full((len(prompts), 64, 64, 3), 0.25, np.float32)
            for position, prompt in enumerate(prompts):
                if prompt == "poisoned":
                    images[position] = np.nan
            return GeneratedImages.from_float(images)

        def truncated_prompts(self, prompts):
            return [False] * len(prompts)

    out = HalfNaN(spec)(work_rows(spec, ["poisoned", "fine"]))

    assert out.column(Col.STATUS).to_pylist() == [STATUS_ERROR, STATUS_OK]
    assert "NaN" in out.column(Col.ERROR).to_pylist()[0]
    assert out.column(Col.IMAGE).to_pylist()[1] is not None


def test_default_negative_prompt_is_encoded_once_and_gives_the_same_images(model_cache):
    negative = "low quality"
    spec = make_spec("out", generation={"negative_prompt": negative})
    stage = GenerateImages(spec, torch_threads=1)
    encoded = []
    original = stage.pipeline.encode_prompt

    def counting_encode(*args, **kwargs):
        encoded.append(kwargs.get("negative_prompt"))
        return original(*args, **kwargs)

    stage.pipeline.encode_prompt = counting_encode
    prompts, seeds = ["a red cube", "a blue ball"], [3, 4]

    cached = stage.run_pipeline(prompts, [negative, negative], seeds)
    # The same call without the cache: the pipeline encodes the negative prompt itself.
    stage.negative_embeddings = None
    uncached = stage.run_pipeline(prompts, [negative, negative], seeds)

    assert encoded == [None, [negative, negative]]  # the cached call encoded no negative
    # Batch of one vs batch of two through the text encoders moves floats in the last
    # bits only (see the field notes): pixels agree to within one level.
    difference = np.abs(cached.pixels.astype(int) - uncached.pixels.astype(int))
    assert difference.max() <= 1
    assert (difference > 0).mean() < 0.01


def test_rows_with_their_own_negative_prompt_do_not_use_the_cached_one(model_cache):
    spec = make_spec("out", generation={"negative_prompt": "low quality"})
    stage = GenerateImages(spec, torch_threads=1)

    kwargs = stage.prompt_kwargs(["a", "b"], ["low quality", "blurry"])

    assert kwargs == {"prompt": ["a", "b"], "negative_prompt": ["low quality", "blurry"]}
    cached = stage.prompt_kwargs(["a", "b"], ["low quality", "low quality"])
    assert "negative_prompt" not in cached
    assert cached["negative_prompt_embeds"].shape[0] == 2


def test_float16_weights_decode_in_a_wider_dtype_and_give_finite_images(model_cache):
    import torch

    spec = make_spec("out", model={"name": "tiny", "dtype": "float16"})
    stage = GenerateImages(spec, torch_threads=1)

    assert stage.pipeline.unet.dtype == torch.float16
    assert stage.pipeline.vae.dtype == torch.float32  # CPU: no bfloat16 decode
    out = stage(work_rows(spec, ["a red cube", "a blue ball"]))
    assert out.column(Col.STATUS).to_pylist() == [STATUS_OK, STATUS_OK]


def test_busy_statistics_count_pipeline_time_and_images(spec):
    class Sleepy(GenerateImages):
        def load_model(self, spec):
            return None

        def run_pipeline(self, prompts, negative_prompts, seeds, **pipeline_kwargs):
            time.sleep(0.05)
            return GeneratedImages.from_float(np.full((len(prompts), 64, 64, 3), 0.5))

        def truncated_prompts(self, prompts):
            return [False] * len(prompts)

    started = time.time()
    stage = Sleepy(spec)
    stage(work_rows(spec, ["a", "b"]))
    stage(work_rows(spec, ["c"]))
    ended = time.time()

    snapshot = stage.stats.snapshot()
    assert snapshot["calls"] == 2 and snapshot["images"] == 3
    # Two calls of at least 50 ms each, within the stage's life.
    assert 0.1 <= snapshot["pipeline_s"] <= ended - started
    summary = busy_summary([snapshot], ended)
    actor = summary["per_actor"][0]
    assert summary["actors"] == 1 and summary["images"] == 3
    assert 0 < actor["busy_fraction"] <= actor["steady_busy_fraction"] <= 1.0
    assert summary["busy_fraction"] == actor["busy_fraction"]


def test_compile_warms_up_at_the_job_batch_shape_before_the_first_batch(model_cache, monkeypatch):
    from koala_batch.stages import generate as generate_module

    applied, calls = [], []
    monkeypatch.setattr(generate_module, "optimize_pipeline", lambda p, s: applied.append(s))

    class Recording(GenerateImages):
        def run_pipeline(self, prompts, negative_prompts, seeds, **pipeline_kwargs):
            calls.append((len(prompts), negative_prompts, pipeline_kwargs))
            return GeneratedImages.from_float(np.full((len(prompts), 64, 64, 3), 0.5))

    compiled = make_spec(
        "out", compute={"compile": True, "batch_size": 3}, generation={"negative_prompt": "bad"}
    )
    Recording(compiled)
    assert [settings.compile for settings in applied] == [True]
    assert calls == [(3, ["bad"] * 3, {"num_inference_steps": 2})]

    applied.clear(), calls.clear()
    Recording(make_spec("out", compute={"batch_size": 3}))
    assert [settings.compile for settings in applied] == [False]
    assert calls == []  # no compilation, nothing to warm up


def test_a_pipeline_call_never_mixes_rows_of_different_parameters(model_cache):
    calls = []

    class Recording(GenerateImages):
        def run_pipeline(self, prompts, negative_prompts, seeds, **pipeline_kwargs):
            calls.append((list(prompts), negative_prompts is not None, pipeline_kwargs))
            return super().run_pipeline(prompts, negative_prompts, seeds, **pipeline_kwargs)

    spec = make_spec(
        "out",
        input={
            "width_column": "w",
            "height_column": "h",
            "steps_column": "s",
            "guidance_scale_column": "g",
            "negative_prompt_column": "neg",
        },
        generation={"width": 64, "height": 64, "steps": 2, "guidance_scale": 5.0},
    )
    stage = Recording(spec, torch_threads=1)
    rows = {
        "prompt": ["p0", "p1", "p2", "p3", "p4", "p5"],
        "w": pa.array([None, 32, None, 32, None, None], pa.int64()),
        "h": pa.array([None, 48, None, 48, None, None], pa.int64()),
        "s": pa.array([None, 1, None, 1, 1, None], pa.int64()),
        "g": pa.array([None, None, None, None, None, 2.0], pa.float64()),
        "neg": pa.array([None, None, "blurry", None, None, None], pa.string()),
    }
    count = len(rows["prompt"])
    table = pa.table(
        {
            Col.SOURCE: ["prompts.parquet"] * count,
            Col.ROW_INDEX: pa.array(range(count), pa.int64()),
            Col.ROW_ORDINAL: pa.array(range(count), pa.int64()),
            **rows,
        }
    )
    work = ExpandImages(spec)(table)

    out = stage(work)

    # One call per bucket: (64x64, 2 steps, 5.0) with and without a negative prompt,
    # (32x48, 1 step), (64x64, 1 step), (64x64, 2 steps, guidance 2.0).
    groups = {
        (tuple(prompts), has_negative): (
            kwargs["width"],
            kwargs["height"],
            kwargs["num_inference_steps"],
            kwargs["guidance_scale"],
        )
        for prompts, has_negative, kwargs in calls
    }
    assert len(calls) == len(groups) == 5
    assert groups == {
        (("p0",), False): (64, 64, 2, 5.0),
        (("p2",), True): (64, 64, 2, 5.0),
        (("p1", "p3"), False): (32, 48, 1, 5.0),
        (("p4",), False): (64, 64, 1, 5.0),
        (("p5",), False): (64, 64, 2, 2.0),
    }
    by_prompt = {row["prompt"]: row for row in out.to_pylist()}
    for prompt, row in by_prompt.items():
        assert row["status"] == STATUS_OK, prompt
        assert Image.open(io.BytesIO(row["image"])).size == (row["width"], row["height"])
    # A row's pixels do not depend on its neighbours: p4 alone, with its own parameters.
    alone = stage.run_pipeline(
        ["p4"], None, [by_prompt["p4"]["seed"]], num_inference_steps=1, width=64, height=64
    )
    decoded = np.asarray(Image.open(io.BytesIO(by_prompt["p4"]["image"])))
    assert np.array_equal(decoded, alone.pixels[0])


def test_decode_takes_the_vaes_own_latent_statistics_for_any_channel_count():
    # A VAE with 8 latent channels and per-channel mean and std (as SDXL-family VAEs that
    # record them): each channel is unscaled with its own values before decoding.
    import types

    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 8],
        latent_channels=8,
        norm_num_groups=8,
        sample_size=16,
    ).eval()
    mean, std = [0.1 * c for c in range(8)], [1.0 + 0.1 * c for c in range(8)]
    vae.register_to_config(latents_mean=mean, latents_std=std)
    latents = torch.randn(2, 8, 8, 8)

    images = decode_latents(types.SimpleNamespace(vae=vae, watermark=None), latents)

    shape = (1, 8, 1, 1)
    unscaled = latents * torch.tensor(std).view(shape) / vae.config.scaling_factor
    with torch.inference_mode():
        expected = vae.decode(unscaled + torch.tensor(mean).view(shape)).sample
    pixels = ((expected / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    assert np.array_equal(images.pixels, pixels.permute(0, 2, 3, 1).numpy())
    assert images.finite.tolist() == [True, True]
