"""The real KOALA and SDXL architectures, built with random weights (no download).

For benchmarks and GPU checks: speed depends on the architecture, not on weight
values. KOALA keeps SDXL's text encoders and VAE and distils the U-Net: one ResNet per
block, fewer transformer layers, and (700M) no mid block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionXLPipeline

SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sdxl": SDXL_UNET,
    "koala-1b": {**SDXL_UNET, "layers_per_block": 1, "transformer_layers_per_block": [1, 2, 6]},
    "koala-700m": {
        **SDXL_UNET,
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 2, 5],
        "mid_block_type": None,
    },
}
UNET_CONFIGS["koala-lightning-1b"] = UNET_CONFIGS["koala-1b"]
UNET_CONFIGS["koala-lightning-700m"] = UNET_CONFIGS["koala-700m"]

# Parameter counts of the published U-Nets, which these configs rebuild exactly.
UNET_PARAMETERS = {"sdxl": 2_567_463_684, "koala-1b": 1_161_184_324, "koala-700m": 782_822_724}

CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
CLIP_BIGG = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
SDXL_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}


def build_unet(name: str):
    """A U-Net of the named architecture (sdxl, koala-700m, koala-1b, lightning variants)."""
    from diffusers import UNet2DConditionModel

    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(UNET_CONFIGS))}")
    return UNet2DConditionModel(**UNET_CONFIGS[name])


def build_random_pipeline(
    name: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> StableDiffusionXLPipeline:
    """A full SDXL-family pipeline of the named architecture with random weights.

    The tokenizers are koala-batch's offline byte-level ones: prompts tokenize to
    different ids than with CLIP's vocabulary, which changes no tensor shape or cost.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from koala_batch.models.tiny import build_clip_tokenizer

    timestep_spacing = "trailing" if "lightning" in name else "leading"
    tokenizer = build_clip_tokenizer()
    common = {
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }
    # The scheduler computes its tables with numpy: build it outside the device context.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing=timestep_spacing,
    )
    with torch.device(device):  # weights are created where they will run
        pipeline = StableDiffusionXLPipeline(
            vae=AutoencoderKL(**SDXL_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**common, **CLIP_L)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**common, **CLIP_BIGG)),
            tokenizer=tokenizer,
            tokenizer_2=build_clip_tokenizer(),
            unet=build_unet(name),
            scheduler=scheduler,
        )
    if dtype is not None:
        pipeline = pipeline.to(dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
