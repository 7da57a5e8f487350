"""The tiny model: SDXL's architecture at toy width, random weights, built in code (no
download), saved once as safetensors and loaded like any other model."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # diffusers is heavy: import it where the model is built
    from diffusers import StableDiffusionXLPipeline

logger = logging.getLogger(__name__)

# Bump when the tiny architecture or its seed changes, so stale caches are not reused.
TINY_MODEL_VERSION = 1


def _byte_to_unicode_table() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def build_clip_tokenizer():
    """A byte-level CLIP tokenizer built in memory (no vocabulary download).

    Every byte maps to one token; the end-of-text token holds the highest id because
    CLIP pools its output at argmax(input_ids).
    """
    from transformers import CLIPTokenizer

    byte_chars = list(_byte_to_unicode_table().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL-architecture pipeline with random weights, small enough for CPU tests.

    Sized like diffusers' own SDXL test components, but with a 4-level VAE so that the
    latent is 1/8 of the image side, as in the real SDXL.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + pooled text 32
        cross_attention_dim=64,  # both text encoders' hidden sizes, concatenated
        norm_num_groups=16,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 16, 32, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=64,
    )
    tokenizer = build_clip_tokenizer()
    text_config = dict(
        bos_token_id=len(tokenizer) - 2,
        eos_token_id=2,  # legacy value: makes CLIP pool at argmax(input_ids)
        pad_token_id=len(tokenizer) - 1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(tokenizer),
        hidden_act="gelu",
        projection_dim=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """Build and save the tiny model once (safetensors); return its directory.

    Safe to call from several processes at once: each builds into a temporary
    directory and the first rename wins. The build is seeded, so every node that
    builds it gets identical weights.
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache_dir / f"tiny-sdxl-v{TINY_MODEL_VERSION}"
    if not (target / "model_index.json").exists():
        save_pipeline_once(build_tiny_pipeline, target)
        logger.info("built the tiny model in %s", target)
    return target


def save_pipeline_once(build: Callable[[], Any], target: Path) -> Path:
    """Build a pipeline and save it at `target` as safetensors, unless it is there.

    Safe to call from several processes at once: each builds into a temporary directory
    beside `target` and the first rename wins, so no reader sees a half-saved model.
    """
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-build-", dir=target.parent))
    try:
        pipeline = build()
        pipeline.save_pretrained(staging, safe_serialization=True)
        del pipeline  # a real architecture holds GBs: free them before the next one
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def default_cache_dir() -> Path:
    """Where built models live: $KOALA_BATCH_CACHE, else ~/.cache/koala-batch."""
    env = os.environ.get("KOALA_BATCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "koala-batch"
