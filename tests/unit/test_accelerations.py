"""The optional accelerations on the tiny model (no Ray): DeepCache and the guidance cut-off.

Both change the images on purpose; the tests pin what must not change (a full DeepCache
step, a cut-off at 1.0, removal), what must be skipped (deep blocks, the unconditional
half of the batch) and that the images stay close to the exact ones and deterministic.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from koala_batch.models.accelerations import (
    DeepCache,
    guidance_cutoff_callback,
    guidance_cutoff_kwargs,
    guided_steps,
)
from koala_batch.models.loading import load_pipeline

SIZE = 64
STEPS = 6
PROMPTS = ["a red cube on a wooden table", "a lighthouse at dusk"]
SEEDS = [1234, 14492353911448343431]


@pytest.fixture(scope="module")
def pipeline(model_cache, one_thread):
    import torch

    return load_pipeline("tiny", dtype="float32", device=torch.device("cpu"), cache_dir=model_cache)


@pytest.fixture
def deep_cache(pipeline) -> Iterator:
    """DeepCache(pipeline.unet, interval) factory; removed after the test, whatever happens."""
    made: list[DeepCache] = []

    def make(interval: int) -> DeepCache:
        made.append(DeepCache(pipeline.unet, interval))
        return made[-1]

    yield make
    for cache in made:
        cache.remove()


def generate(pipeline, prompts=PROMPTS, seeds=SEEDS, guidance=5.0, **kwargs) -> np.ndarray:
    """Images as koala_batch.stages.generate calls the pipeline: one torch.Generator per image."""
    import torch

    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    with torch.inference_mode():
        result = pipeline(
            prompt=list(prompts),
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            width=SIZE,
            height=SIZE,
            generator=generators,
            output_type="np",
            **kwargs,
        )
    return np.asarray(result.images)


@pytest.fixture(scope="module")
def exact(pipeline) -> np.ndarray:
    return generate(pipeline)


def mean_abs_uint8(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean() * 255)


@contextmanager
def deep_block_log(unet) -> Iterator[list[bool]]:
    """One entry per U-Net call: whether its second down block (a deep one) ran."""
    log: list[bool] = []
    handles = [
        unet.register_forward_pre_hook(lambda module, args: log.append(False)),
        unet.down_blocks[1].register_forward_hook(
            lambda module, args, output: log.__setitem__(-1, True)
        ),
    ]
    try:
        yield log
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def unet_batch_log(unet) -> Iterator[list[int]]:
    """The latent batch size of each U-Net call."""
    sizes: list[int] = []
    handle = unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    try:
        yield sizes
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------
# DeepCache on the U-Net alone


def small_unet(kind: str, pipeline):
    """A copy of the tiny model's U-Net, or a narrow one shaped like KOALA's (three levels,
    one ResNet per block, with or without a mid block)."""
    import torch
    from diffusers import UNet2DConditionModel

    if kind == "tiny":
        return copy.deepcopy(pipeline.unet)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return UNet2DConditionModel(
            block_out_channels=(16, 32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            mid_block_type=None if kind == "koala-700m-shaped" else "UNetMidBlock2DCrossAttn",
            attention_head_dim=(2, 4, 8),
            transformer_layers_per_block=(1, 2, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,
            cross_attention_dim=64,
            norm_num_groups=8,
        ).eval()


def unet_inputs(batch: int, side: int, seed: int = 0) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, side, side, generator=generator),
        "timestep": torch.tensor(601),
        "encoder_hidden_states": torch.randn(batch, 77, 64, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 32, generator=generator),
            "time_ids": torch.tensor([[side * 8.0, side * 8.0, 0, 0, side * 8.0, side * 8.0]])
            .repeat(batch, 1)
            .float(),
        },
    }


# 10 is no multiple of the 3-level U-Nets' upsampling factor: diffusers forwards the
# upsample sizes then, and the cached features must still fit.
@pytest.mark.parametrize(
    ("kind", "side"),
    [("tiny", 8), ("koala-700m-shaped", 8), ("koala-1b-shaped", 8), ("koala-700m-shaped", 10)],
)
def test_full_step_is_the_original_forward_and_a_cached_step_reuses_it(pipeline, kind, side):
    import torch

    unet = small_unet(kind, pipeline)
    inputs = unet_inputs(2, side)
    with torch.inference_mode():
        original = unet(**inputs).sample
        cache = DeepCache(unet, 3)
        try:
            full = unet(**inputs).sample
            # Same inputs as the full step: the cheap path over the cached deep features
            # must then rebuild the very same output, so its wiring is the original's.
            cached = unet(**inputs, return_dict=False)
            other = unet(**unet_inputs(2, side, seed=1)).sample
        finally:
            cache.remove()
        restored = unet(**inputs).sample
    assert (cache.full_steps, cache.cached_steps) == (1, 2)
    assert torch.equal(full, original)
    assert isinstance(cached, tuple) and len(cached) == 1
    assert torch.equal(cached[0], original)
    assert other.shape == original.shape and torch.isfinite(other).all()
    assert not torch.equal(other, original)
    assert torch.equal(restored, original)


def test_a_call_the_cache_does_not_fit_is_a_full_step(pipeline):
    import torch

    unet = small_unet("tiny", pipeline)
    cache = DeepCache(unet, 4)
    try:
        with deep_block_log(unet) as log, torch.inference_mode():
            unet(**unet_inputs(2, 8))
            unet(**unet_inputs(2, 8))  # cached
            unet(**unet_inputs(1, 8))  # another batch size, as after a guidance cut-off
            unet(**unet_inputs(1, 8))  # cached
            unet(**unet_inputs(1, 6))  # another size
    finally:
        cache.remove()
    assert log == [True, False, True, False, True]


def test_a_cached_step_that_raises_puts_the_deep_blocks_back(pipeline):
    import torch

    unet = small_unet("tiny", pipeline)
    deep = [unet.down_blocks[1], unet.mid_block, unet.up_blocks[0]]
    inputs = unet_inputs(2, 8)
    failing = True

    def fail_once(module, args, kwargs):
        if failing:
            raise RuntimeError("out of memory, say")

    cache = DeepCache(unet, 3)
    try:
        with torch.inference_mode():
            original = unet(**inputs).sample  # full: the cache is filled
            handle = unet.up_blocks[-1].register_forward_pre_hook(fail_once, with_kwargs=True)
            with pytest.raises(RuntimeError, match="out of memory"):
                unet(**inputs)  # cached, raising mid-call
            handle.remove()
            assert [unet.down_blocks[1], unet.mid_block, unet.up_blocks[0]] == deep
            failing = False
            cached = unet(**inputs).sample
    finally:
        cache.remove()
    assert (cache.full_steps, cache.cached_steps) == (1, 1)
    assert torch.equal(cached, original)


def test_unsupported_inputs_and_settings_are_refused(pipeline):
    import torch

    unet = small_unet("tiny", pipeline)
    with pytest.raises(ValueError, match="interval"):
        DeepCache(unet, 1)
    cache = DeepCache(unet, 2)
    try:
        with pytest.raises(ValueError, match="already"):
            DeepCache(unet, 2)
        inputs = unet_inputs(2, 8)
        with pytest.raises(NotImplementedError, match="ControlNet"), torch.inference_mode():
            unet(**inputs, mid_block_additional_residual=torch.zeros(2, 64, 4, 4))
    finally:
        cache.remove()
    assert "forward" not in vars(unet)
    DeepCache(unet, 2).remove()  # removed, the U-Net takes a new one


# ---------------------------------------------------------------------------------------
# DeepCache in the pipeline


@pytest.mark.parametrize("interval", [2, 3])
def test_deep_cache_skips_the_deep_blocks_between_full_steps(pipeline, exact, deep_cache, interval):
    cache = deep_cache(interval)
    with deep_block_log(pipeline.unet) as log:
        first = generate(pipeline)
    cache.reset()
    second = generate(pipeline)

    # One U-Net call per step (both guidance halves in one batch); N-1 of every N cheap.
    assert log == [step % interval == 0 for step in range(STEPS)]
    assert cache.full_steps == 2 * math.ceil(STEPS / interval)
    assert first.shape == exact.shape and np.isfinite(first).all()
    assert np.array_equal(first, second)
    difference = mean_abs_uint8(first, exact)
    # Random weights predict noise-like outputs, so the reused features move the tiny
    # model's pixels more than a trained model's (measured ~1 at interval 2, ~2 at 3).
    assert 0 < difference < 12, difference


def test_reset_makes_the_next_calls_first_step_full(pipeline, deep_cache):
    cache = deep_cache(4)
    with deep_block_log(pipeline.unet) as log:
        generate(pipeline)  # 6 steps: full, 3 cached, full, cached
        generate(pipeline)  # no reset: the cache of the last call serves its first steps
        cache.reset()
        generate(pipeline)
    first, second, third = log[:STEPS], log[STEPS : 2 * STEPS], log[2 * STEPS :]
    assert first == [True, False, False, False, True, False]
    assert second[:2] == [False, False]
    assert third == first


def test_remove_restores_the_exact_images(pipeline, exact):
    cache = DeepCache(pipeline.unet, 2)
    try:
        approximate = generate(pipeline)
    finally:
        cache.remove()
    cache.remove()  # idempotent
    assert not np.array_equal(approximate, exact)
    assert np.array_equal(generate(pipeline), exact)


# ---------------------------------------------------------------------------------------
# Guidance cut-off


@pytest.mark.parametrize(
    ("fraction", "steps", "guided"),
    [(1.0, 6, 6), (0.5, 6, 3), (0.5, 25, 13), (0.3, 10, 3), (0.01, 6, 1), (0.99, 6, 6)],
)
def test_guided_steps(fraction, steps, guided):
    assert guided_steps(fraction, steps) == guided


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_a_fraction_outside_zero_to_one_is_refused(fraction):
    with pytest.raises(ValueError, match="fraction"):
        guidance_cutoff_callback(fraction)


def test_cutoff_at_one_changes_nothing(pipeline, exact):
    with unet_batch_log(pipeline.unet) as sizes:
        images = generate(pipeline, **guidance_cutoff_kwargs(1.0))
    assert sizes == [2 * len(PROMPTS)] * STEPS
    assert np.array_equal(images, exact)


def test_cutoff_runs_the_later_steps_on_one_latent_per_image(pipeline, exact):
    kwargs = guidance_cutoff_kwargs(0.5)
    assert kwargs["callback_on_step_end_tensor_inputs"] == [
        "prompt_embeds",
        "add_text_embeds",
        "add_time_ids",
    ]
    with unet_batch_log(pipeline.unet) as sizes:
        images = generate(pipeline, **kwargs)
    again = generate(pipeline, **kwargs)  # the same callback serves every call

    assert sizes == [4, 4, 4, 2, 2, 2]
    assert np.isfinite(images).all()
    assert np.array_equal(images, again)
    assert not np.array_equal(images, exact)
    assert 0 < mean_abs_uint8(images, exact) < 12
    # The callback zeroes the pipeline's guidance scale; the next call must set it again.
    assert np.array_equal(generate(pipeline), exact)


def test_cutoff_conditions_each_image_on_its_own_prompt(pipeline):
    # diffusers' SDXLCFGCutoffCallback keeps row [-1:], which breaks a batch of several
    # prompts; each image of a batch must match the same image made alone.
    kwargs = guidance_cutoff_kwargs(0.5)
    together = generate(pipeline, **kwargs)
    for index in range(len(PROMPTS)):
        alone = generate(pipeline, [PROMPTS[index]], [SEEDS[index]], **kwargs)
        # Batch size moves floats by ~2e-6 (see test_golden_pixels); another prompt, ~1e-2.
        assert np.abs(together[index] - alone[0]).max() < 1e-4


def test_cutoff_without_guidance_does_nothing(pipeline):
    plain = generate(pipeline, guidance=1.0)
    with unet_batch_log(pipeline.unet) as sizes:
        images = generate(pipeline, guidance=1.0, **guidance_cutoff_kwargs(0.5))
    assert sizes == [len(PROMPTS)] * STEPS
    assert np.array_equal(images, plain)


def test_cutoff_and_deep_cache_together(pipeline, exact, deep_cache):
    deep_cache(4)
    with deep_block_log(pipeline.unet) as log, unet_batch_log(pipeline.unet) as sizes:
        images = generate(pipeline, **guidance_cutoff_kwargs(0.5))
    assert sizes == [4, 4, 4, 2, 2, 2]
    # The cached features of the guided batch do not fit the halved one: a full step there.
    assert log == [True, False, False, True, False, False]
    assert np.isfinite(images).all()
    assert 0 < mean_abs_uint8(images, exact) < 20
