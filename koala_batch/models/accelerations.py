"""Optional accelerations of the SDXL denoising loop, both off by default, both lossy.

- Guidance cut-off: classifier-free guidance for the first part of the steps only; the
  later steps run the U-Net on one latent per image instead of two.
- DeepCache (Ma et al., 2023, arXiv:2312.00858): the whole U-Net runs every `interval`
  steps; the steps in between run only its outermost layers and reuse the deep features
  of the last full step.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from koala_batch.compat import set_guidance_scale

if TYPE_CHECKING:  # torch and diffusers are heavy: imported where they are used
    import torch

# The SDXL pipeline's names of the tensors the cut-off halves; with guidance each holds the
# unconditional rows first, then the conditional ones (the pipeline's torch.cat order).
GUIDANCE_CUTOFF_TENSOR_INPUTS = ("prompt_embeds", "add_text_embeds", "add_time_ids")


def guided_steps(fraction: float, steps: int) -> int:
    """How many of `steps` steps keep guidance: ceil(fraction x steps), at least one."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"guidance cut-off must be a fraction in (0, 1], got {fraction!r}")
    # The epsilon keeps float noise (0.3 * 10 = 3.0000000000000004) from adding a step.
    return min(steps, max(1, math.ceil(fraction * steps - 1e-9)))


def guidance_cutoff_callback(fraction: float) -> Any:
    """A `callback_on_step_end` for StableDiffusionXLPipeline that turns classifier-free
    guidance off after `fraction` of the steps (ceil(fraction x steps) steps are guided).

    Not diffusers' SDXLCFGCutoffCallback: that one keeps row [-1:] of each embedding,
    right for one image per call only; with several, the U-Net gets one row of embeddings
    for several latents and fails (diffusers 0.42.1: a size mismatch in attention), and it
    cuts a batch that had no guidance to begin with as well. This one keeps the
    conditional half, and does nothing without guidance. Stateless, so one instance serves
    any number of calls; it sets the pipeline's guidance scale to 0, which the next call
    sets again. Pass it with `callback_on_step_end_tensor_inputs`: see
    guidance_cutoff_kwargs.
    """
    guided_steps(fraction, 1)  # validates the fraction now rather than mid-job

    def cut_guidance(
        pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        # Runs after step `step_index`: the step after the last guided one is unguided.
        if step_index + 1 != guided_steps(fraction, pipeline.num_timesteps):
            return callback_kwargs
        if not pipeline.do_classifier_free_guidance:
            return callback_kwargs
        set_guidance_scale(pipeline, 0.0)
        for name in GUIDANCE_CUTOFF_TENSOR_INPUTS:
            tensor = callback_kwargs[name]
            callback_kwargs[name] = tensor[tensor.shape[0] // 2 :]
        return callback_kwargs

    return cut_guidance


def guidance_cutoff_kwargs(fraction: float) -> dict[str, Any]:
    """The StableDiffusionXLPipeline call arguments for a guidance cut-off at `fraction`:
    the callback and the tensors it must be given. Merge them into every pipeline call."""
    return {
        "callback_on_step_end": guidance_cutoff_callback(fraction),
        "callback_on_step_end_tensor_inputs": list(GUIDANCE_CUTOFF_TENSOR_INPUTS),
    }


class DeepCache:
    """DeepCache (Ma et al., 2023) for a diffusers UNet2DConditionModel: every `interval`
    steps the whole U-Net runs and the input to its last up block (the deep features) is
    cached; on the steps in between the deep blocks (every down block but the first, the
    mid block, every up block but the last) are skipped, and the last up block takes the
    cached features.

    Each U-Net call is one step (with guidance the pipeline batches both latents in one
    call). A step is also full when the cache does not fit the call: another batch size
    (after a guidance cut-off), image size, dtype or device. Call reset() before each
    pipeline call, so that its first step is full; remove() restores the U-Net.

    Only public torch hooks: a pre-hook on the U-Net chooses the step and, for a cached
    one, puts `SkippedBlock`s in the deep blocks' places in their ModuleLists; a hook after
    it puts the blocks back (also when the call raised). Every step runs diffusers' own
    forward, so a full step gives exactly what the U-Net gives without DeepCache.
    """

    def __init__(self, unet: Any, interval: int) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 2:
            raise ValueError(f"DeepCache interval must be an integer >= 2, got {interval!r}")
        check_deep_cache_support(unet)
        if unet in _CACHED_UNETS:
            raise ValueError("the U-Net already has a DeepCache (DeepCache applied twice?)")
        self.unet = unet
        self.interval = interval
        self.full_steps = 0  # since construction: for tests and logs
        self.cached_steps = 0
        self._deep: torch.Tensor | None = None
        self._deep_key: tuple[Any, ...] | None = None  # what the cached features fit
        self._since_full = 0
        self._step: str | None = None  # "full" or "cached" while a U-Net call runs
        self._captured: list[torch.Tensor] = []  # what the last up block saw in a full step
        self._skipped = skipped_blocks(unet, self._cached_features)
        self._hooks = [
            unet.register_forward_pre_hook(self._before_step, with_kwargs=True),
            unet.register_forward_hook(self._after_step, with_kwargs=True, always_call=True),
            unet.up_blocks[-1].register_forward_pre_hook(
                self._keep_deep_features, with_kwargs=True
            ),
        ]
        _CACHED_UNETS.add(unet)

    def reset(self) -> None:
        """Forget the cached features: the next U-Net call is a full step."""
        self._deep = None
        self._deep_key = None
        self._since_full = 0
        self._captured.clear()

    def remove(self) -> None:
        """Take the hooks off the U-Net and drop the cache (idempotent)."""
        for hook in self._hooks:
            hook.remove()
        _CACHED_UNETS.discard(self.unet)
        self.reset()

    def _cached_features(self) -> torch.Tensor:
        assert self._deep is not None
        return self._deep

    def _before_step(self, unet: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # Refused on every step, not only cached ones, so a job fails on its first call.
        if any(kwargs.get(name) is not None for name in _RESIDUAL_INPUTS):
            raise NotImplementedError("DeepCache does not support ControlNet/adapter residuals")
        if (kwargs.get("cross_attention_kwargs") or {}).get("gligen") is not None:
            raise NotImplementedError("DeepCache does not support GLIGEN")
        sample = args[0] if args else kwargs["sample"]
        key = (tuple(sample.shape), sample.dtype, sample.device)
        full = self._deep is None or self._deep_key != key or self._since_full + 1 >= self.interval
        if full:
            self._captured.clear()  # left over if an earlier full step raised
            self._deep_key = key
            self._step = "full"
            return
        self._step = "cached"
        for owner, name, _, skipped in self._skipped:
            setattr(owner, name, skipped)

    def _after_step(
        self, unet: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        step, self._step = self._step, None
        if step == "cached":
            for owner, name, block, _ in self._skipped:
                setattr(owner, name, block)
            if output is not None:
                self._since_full += 1
                self.cached_steps += 1
        elif step == "full" and output is not None:
            if len(self._captured) != 1:
                raise RuntimeError("DeepCache: the U-Net's last up block did not run once")
            self._deep = self._captured.pop()
            self._since_full = 0
            self.full_steps += 1

    def _keep_deep_features(
        self, block: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if self._step == "full":
            self._captured.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])


# The U-Nets that have a DeepCache: one each (two would fight over the deep blocks).
_CACHED_UNETS: weakref.WeakSet[Any] = weakref.WeakSet()
_RESIDUAL_INPUTS = (
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
)


def skipped_blocks(unet: Any, features: Callable[[], torch.Tensor]) -> list[tuple[Any, ...]]:
    """(owner, attribute name, the deep block, its SkippedBlock) for each block a cached
    step skips; the owner is a ModuleList (names "1", "2", ...) or the U-Net (the mid
    block). A skipped down block passes its input on and gives as many
    residuals as the block does, so that the U-Net hands the last up block the same ones;
    a skipped up block gives the cached features (the last one's input)."""
    from torch import nn

    class SkippedBlock(nn.Module):
        """Stands in for a deep block on a cached step: no work, the right outputs."""

        resnets: tuple[Any, ...]  # up blocks: diffusers slices the residuals by its length

        def __init__(self, residuals: int | None, resnets: tuple[Any, ...] = ()) -> None:
            super().__init__()
            self.residuals = residuals  # down blocks: how many they give; None otherwise
            self.resnets = resnets

        def forward(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
            if self.residuals is not None:
                return hidden_states, (hidden_states,) * self.residuals
            return features()

    skipped: list[tuple[Any, ...]] = []
    for index, block in enumerate(unet.down_blocks):
        if index > 0:
            residuals = len(block.resnets) + (1 if block.downsamplers is not None else 0)
            skipped.append((unet.down_blocks, str(index), block, SkippedBlock(residuals)))
    if unet.mid_block is not None:
        skipped.append((unet, "mid_block", unet.mid_block, SkippedBlock(None)))
    for index, block in enumerate(unet.up_blocks[:-1]):
        up = SkippedBlock(None, tuple(block.resnets))
        skipped.append((unet.up_blocks, str(index), block, up))
    return skipped


def check_deep_cache_support(unet: Any) -> None:
    """Raise ValueError unless DeepCache can run this U-Net (an SDXL-style one)."""
    if not hasattr(unet, "up_blocks") or not hasattr(unet, "down_blocks"):
        raise ValueError(f"DeepCache needs a UNet2DConditionModel, got {type(unet).__name__}")
    if len(unet.up_blocks) < 2:
        raise ValueError("DeepCache needs a U-Net with at least two levels")
    if unet.config.addition_embed_type == "image_hint":
        raise ValueError("DeepCache does not support addition_embed_type 'image_hint'")
    # The last up block must need only conv_in's and the first down block's outputs
    # (always so in diffusers' U-Nets: layers_per_block + 1 of them).
    available = 1 + len(unet.down_blocks[0].resnets)
    if len(unet.up_blocks[-1].resnets) > available:
        raise ValueError("DeepCache: the last up block needs residuals from deeper blocks")
