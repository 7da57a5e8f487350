"""Optional accelerations of the SDXL denoising loop, both off by default, both lossy.

- Guidance cut-off: classifier-free guidance for the first part of the steps only; the
  later steps run the U-Net on one latent per image instead of two.
- DeepCache (Ma et al., 2023, arXiv:2312.00858): the whole U-Net runs every `interval`
  steps; the steps in between run only its outermost layers and reuse the deep features
  of the last full step.
"""

from __future__ import annotations

import math
import types
from typing import TYPE_CHECKING, Any

from koala_batch.compat import set_guidance_scale, with_lora_scale

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
    cached; on the steps in between only the embeddings, conv_in, the first down block, the
    last up block and the output layers run, reusing the cached deep features.

    Each U-Net call is one step (with guidance the pipeline batches both latents in one
    call). A step is also full when the cache does not fit the call: another batch size
    (after a guidance cut-off), image size, dtype or device. Call reset() before each
    pipeline call, so that its first step is full; remove() restores the U-Net.

    Full steps run diffusers' own forward, so they give exactly what the U-Net gives
    without DeepCache; a forward pre-hook on the last up block keeps its input.
    """

    def __init__(self, unet: Any, interval: int) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 2:
            raise ValueError(f"DeepCache interval must be an integer >= 2, got {interval!r}")
        check_deep_cache_support(unet)
        if "forward" in vars(unet):
            raise ValueError("the U-Net's forward is already replaced (DeepCache applied twice?)")
        self.unet = unet
        self.interval = interval
        self.full_steps = 0  # since construction: for tests and logs
        self.cached_steps = 0
        self._deep: torch.Tensor | None = None
        self._deep_key: tuple[Any, ...] | None = None  # what the cached features fit
        self._since_full = 0
        self._capturing = False
        self._captured: list[torch.Tensor] = []  # what the hook saw during a full step
        self._hook = unet.up_blocks[-1].register_forward_pre_hook(
            self._keep_deep_features, with_kwargs=True
        )
        # Cached steps take LoRA scales as diffusers' forward does (it carries this decorator).
        cached = with_lora_scale(self._cached_forward)
        self._forward = types.MethodType(self._make_forward(cached), unet)
        unet.forward = self._forward

    def reset(self) -> None:
        """Forget the cached features: the next U-Net call is a full step."""
        self._deep = None
        self._deep_key = None
        self._since_full = 0
        self._captured.clear()

    def remove(self) -> None:
        """Restore the U-Net's own forward and drop the cache (idempotent)."""
        if vars(self.unet).get("forward") is self._forward:
            del self.unet.forward
        self._hook.remove()
        self.reset()

    def _make_forward(self, cached: Any) -> Any:
        deep_cache = self

        def forward(
            unet: Any,
            sample: torch.Tensor,
            timestep: torch.Tensor | float | int,
            encoder_hidden_states: torch.Tensor,
            class_labels: torch.Tensor | None = None,
            timestep_cond: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            cross_attention_kwargs: dict[str, Any] | None = None,
            added_cond_kwargs: dict[str, torch.Tensor] | None = None,
            down_block_additional_residuals: tuple[torch.Tensor] | None = None,
            mid_block_additional_residual: torch.Tensor | None = None,
            down_intrablock_additional_residuals: tuple[torch.Tensor] | None = None,
            encoder_attention_mask: torch.Tensor | None = None,
            return_dict: bool = True,
        ) -> Any:
            # Refused on every step, not only cached ones, so a job fails on its first call.
            if (
                down_block_additional_residuals is not None
                or mid_block_additional_residual is not None
                or down_intrablock_additional_residuals is not None
            ):
                raise NotImplementedError("DeepCache does not support ControlNet/adapter residuals")
            if cross_attention_kwargs and cross_attention_kwargs.get("gligen") is not None:
                raise NotImplementedError("DeepCache does not support GLIGEN")
            arguments = {
                "class_labels": class_labels,
                "timestep_cond": timestep_cond,
                "attention_mask": attention_mask,
                "cross_attention_kwargs": cross_attention_kwargs,
                "added_cond_kwargs": added_cond_kwargs,
                "encoder_attention_mask": encoder_attention_mask,
                "return_dict": return_dict,
            }
            key = (tuple(sample.shape), sample.dtype, sample.device)
            full = (
                deep_cache._deep is None
                or deep_cache._deep_key != key
                or deep_cache._since_full + 1 >= deep_cache.interval
            )
            if not full:
                deep_cache._since_full += 1
                deep_cache.cached_steps += 1
                return cached(unet, sample, timestep, encoder_hidden_states, **arguments)
            deep_cache._captured.clear()  # left over if an earlier full step raised
            deep_cache._capturing = True
            try:
                output = type(unet).forward(
                    unet, sample, timestep, encoder_hidden_states, **arguments
                )
            finally:
                deep_cache._capturing = False
            if len(deep_cache._captured) != 1:
                raise RuntimeError("DeepCache: the U-Net's last up block did not run once")
            deep_cache._deep = deep_cache._captured.pop()
            deep_cache._deep_key = key
            deep_cache._since_full = 0
            deep_cache.full_steps += 1
            return output

        return forward

    def _keep_deep_features(
        self, block: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if self._capturing:
            self._captured.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    def _cached_forward(
        self,
        unet: Any,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        """UNet2DConditionModel.forward of diffusers 0.42 with the deep part replaced by the
        cached features: same embeddings, conv_in, first down block, last up block, output."""
        import torch
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = (1 - encoder_attention_mask.to(sample.dtype)) * -10000.0
            encoder_attention_mask = encoder_attention_mask.unsqueeze(1)
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0

        t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
        emb = unet.time_embedding(t_emb, timestep_cond)
        class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            if unet.config.class_embeddings_concat:
                emb = torch.cat([emb, class_emb], dim=-1)
            else:
                emb = emb + class_emb
        aug_emb = unet.get_aug_embed(
            emb=emb,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond_kwargs,
        )
        emb = emb + aug_emb if aug_emb is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        encoder_hidden_states = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        attention = {
            "encoder_hidden_states": encoder_hidden_states,
            "attention_mask": attention_mask,
            "cross_attention_kwargs": cross_attention_kwargs,
            "encoder_attention_mask": encoder_attention_mask,
        }

        sample = unet.conv_in(sample)
        first = unet.down_blocks[0]
        # The whole first block runs, its downsampler too (a few % of a cached step): its
        # output feeds the second-to-last up block only, which is skipped.
        if getattr(first, "has_cross_attention", False):
            _, first_res = first(hidden_states=sample, temb=emb, **attention)
        else:
            _, first_res = first(hidden_states=sample, temb=emb)
        # The last up block takes the first residuals: conv_in's and the first block's.
        last = unet.up_blocks[-1]
        skips = (sample, *first_res)[: len(last.resnets)]
        if getattr(last, "has_cross_attention", False):
            sample = last(
                hidden_states=self._deep,
                temb=emb,
                res_hidden_states_tuple=skips,
                upsample_size=None,
                **attention,
            )
        else:
            sample = last(
                hidden_states=self._deep,
                temb=emb,
                res_hidden_states_tuple=skips,
                upsample_size=None,
            )

        if unet.conv_norm_out:
            sample = unet.conv_norm_out(sample)
            sample = unet.conv_act(sample)
        sample = unet.conv_out(sample)
        if not return_dict:
            return (sample,)
        return UNet2DConditionOutput(sample=sample)


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
