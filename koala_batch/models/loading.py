"""Model presets, the offline tiny SDXL, and pipeline loading.

Every model, the tiny one included, is loaded the same way: with
`StableDiffusionXLPipeline.from_pretrained(..., use_safetensors=True)` from a local
directory or a Hugging Face id, with an explicit device and dtype.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from koala_batch.errors import ModelUnavailableError, UnsafeWeightsError

if TYPE_CHECKING:  # torch and diffusers are heavy: import them where the model is built
    import torch
    from diffusers import StableDiffusionXLPipeline

logger = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny"
# Bump when the tiny architecture or its seed changes, so stale caches are not reused.
TINY_MODEL_VERSION = 1


@dataclass(frozen=True)
class ModelPreset:
    """A named model with the sampler settings its authors recommend."""

    name: str
    source: str  # Hugging Face id, or TINY_MODEL_NAME for the in-code model
    steps: int
    guidance_scale: float
    scheduler_timestep_spacing: str | None = None  # None keeps the repository's scheduler
    default_size: int = 1024
    # The weights' license as a Hugging Face license id, for the dataset card. The KOALA
    # model cards on the Hub (etri-vilab/koala-*) declare none in their metadata (tags
    # only), so "unknown": read the model card before redistributing their images.
    license: str = "unknown"


# 700m/1b: the model cards recommend 25 steps and pass no guidance (diffusers' 5.0 applies).
PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset("koala-700m", "etri-vilab/koala-700m", steps=25, guidance_scale=5.0),
        ModelPreset("koala-1b", "etri-vilab/koala-1b", steps=25, guidance_scale=5.0),
        ModelPreset(
            "koala-lightning-700m",
            "etri-vilab/koala-lightning-700m",
            steps=10,
            guidance_scale=3.5,
            scheduler_timestep_spacing="trailing",
        ),
        ModelPreset(
            "koala-lightning-1b",
            "etri-vilab/koala-lightning-1b",
            steps=10,
            guidance_scale=3.5,
            scheduler_timestep_spacing="trailing",
        ),
        # Random weights built in code: koala-batch's own license.
        ModelPreset(
            TINY_MODEL_NAME,
            TINY_MODEL_NAME,
            steps=4,
            guidance_scale=5.0,
            default_size=64,
            license="apache-2.0",
        ),
    )
}

# Used when model.name is a local directory or a Hugging Face id that is not a preset.
GENERIC_DEFAULTS = ModelPreset("custom", "", steps=25, guidance_scale=5.0)

# What `from_pretrained` takes for a Hub repository: "owner/name", each part of letters,
# digits, '-', '_' and '.'.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def did_you_mean(name: str) -> str:
    """' (did you mean X?)' for a name close to a preset or its Hub id, else ''."""
    candidates = {**{p: p for p in PRESETS}, **{p.source: p.name for p in PRESETS.values()}}
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    return f" (did you mean {candidates[close[0]]}?)" if close else ""


def unknown_model_error(name: str, what: str = "model.name") -> ModelUnavailableError:
    """The error for a model name that is no preset, local directory or Hugging Face id,
    with the preset it is closest to."""
    return ModelUnavailableError(
        f"{what} {name!r} is not a preset, an existing directory or a Hugging Face "
        f"id{did_you_mean(name)}; presets: {', '.join(PRESETS)}"
    )


def check_model_name(name: str, what: str = "model.name") -> None:
    """Refuse a name that is neither a preset nor a Hugging Face id ("owner/name"); call
    it once no local directory of that name exists.

    A typo of a preset would otherwise reach the Hub, whose answer (a connection error
    offline, "no such repository" online) says nothing of the preset meant."""
    if name not in PRESETS and not HUB_ID.match(name):
        raise unknown_model_error(name, what)


def preset_for(name: str, preset: str | None = None) -> ModelPreset:
    """The preset whose sampler settings apply: `preset` (model.preset) when given, else
    the one `name` names (a preset or its Hugging Face id), else generic SDXL defaults."""
    if preset is not None:
        return PRESETS[preset]
    if name in PRESETS:
        return PRESETS[name]
    return next((p for p in PRESETS.values() if p.source == name), GENERIC_DEFAULTS)


def default_cache_dir() -> Path:
    """Where built models live: $KOALA_BATCH_CACHE, else ~/.cache/koala-batch."""
    env = os.environ.get("KOALA_BATCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "koala-batch"


# ---------------------------------------------------------------------------------------
# The tiny model: SDXL's architecture at toy width, random weights, no download.


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


# ---------------------------------------------------------------------------------------
# Loading


def resolve_model_source(name: str, cache_dir: Path | None = None) -> str:
    """The local directory or HF id that from_pretrained will load for model.name."""
    if name == TINY_MODEL_NAME:
        return str(ensure_tiny_model(cache_dir))
    if name in PRESETS:
        return PRESETS[name].source
    return name


def check_local_weights_are_safetensors(directory: Path) -> None:
    """Refuse a local model whose components carry pickle (.bin/.pt/.ckpt) weights only."""
    index_path = directory / "model_index.json"
    if not index_path.exists():
        raise FileNotFoundError(f"model directory {directory} has no model_index.json")
    components = [k for k, v in json.loads(index_path.read_text()).items() if isinstance(v, list)]
    for component in components:
        folder = directory / component
        if not folder.is_dir():
            continue
        files = [p.name for p in folder.iterdir()]
        has_pickle = any(n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")) for n in files)
        has_safetensors = any(n.endswith(".safetensors") for n in files)
        if has_pickle and not has_safetensors:
            raise UnsafeWeightsError(
                f"model component {folder} holds pickle weights only "
                f"({', '.join(sorted(files))}); koala-batch loads safetensors only: "
                "convert the weights to .safetensors"
            )


def resolve_dtype(dtype_name: str, device: torch.device) -> torch.dtype:
    """model.dtype to a torch dtype; 'auto' is bfloat16 on CUDA and float32 on CPU."""
    import torch

    if dtype_name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        dtype_name
    ]


def pick_device() -> torch.device:
    """CUDA when torch sees it, else CPU (Ray's GPU assignment alone is not proof)."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quiet_library_logging() -> None:
    """Silence diffusers/transformers progress bars and per-call warnings in workers.

    The warnings they print per batch (prompt truncation, say) are recorded in the
    manifest instead, where they can be queried.
    """
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_pipeline(
    name: str,
    *,
    dtype: str = "auto",
    revision: str | None = None,
    variant: str | None = None,
    device: torch.device | None = None,
    cache_dir: Path | None = None,
    preset: str | None = None,
) -> StableDiffusionXLPipeline:
    """Load a StableDiffusionXLPipeline from safetensors on an explicit device and dtype.

    With float16 weights the VAE is kept in `decode_dtype` (bfloat16 or float32): decode
    latents with `koala_batch.stages.generate.decode_latents`, which casts them to it. `preset`
    (model.preset) names the preset whose scheduler applies to a directory or a copy.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    quiet_library_logging()
    device = device or pick_device()
    torch_dtype = resolve_dtype(dtype, device)
    source = resolve_model_source(name, cache_dir)
    if Path(source).is_dir():
        check_local_weights_are_safetensors(Path(source))
    # use_safetensors=True makes diffusers raise rather than fall back to pickle files.
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        source,
        dtype=torch_dtype,
        use_safetensors=True,
        revision=revision,
        variant=variant,
    )
    settings = preset_for(name, preset)
    if settings.scheduler_timestep_spacing:
        pipeline.scheduler = EulerDiscreteScheduler.from_config(
            pipeline.scheduler.config, timestep_spacing=settings.scheduler_timestep_spacing
        )
    pipeline.set_progress_bar_config(disable=True)
    vae_dtype = decode_dtype(torch_dtype, pipeline.vae, device)
    if vae_dtype != torch_dtype:
        pipeline.vae.to(dtype=vae_dtype)
    return pipeline.to(device)


# ---------------------------------------------------------------------------------------
# Speed: memory format, fused projections, the fp16 VAE, compilation


def decode_dtype(model_dtype: torch.dtype, vae: Any, device: torch.device) -> torch.dtype:
    """The dtype the VAE decodes in.

    SDXL's VAE overflows in float16 (its config sets `force_upcast`): diffusers then casts
    it to float32 and back on every call. It is kept in bfloat16 instead where the
    device supports it (same range as float32, decodes SDXL cleanly), else in float32.
    """
    import torch

    if model_dtype != torch.float16 or not getattr(vae.config, "force_upcast", False):
        return model_dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_compile_cache_dir() -> Path:
    """Where torch.compile keeps compiled kernels between actor restarts."""
    return default_cache_dir() / "torch-compile"


def use_compile_cache(directory: Path) -> None:
    """Point inductor's and Triton's on-disk caches at `directory` (unless the user has).

    Their defaults live under /tmp, which a restarted container loses; a directory on the
    node's disk lets a restarted actor load compiled kernels instead of compiling again.
    """
    directory.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(directory / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(directory / "triton"))


@dataclass(frozen=True)
class SpeedSettings:
    """How the pipeline's modules are laid out and compiled (not what they compute)."""

    channels_last: bool = False
    fuse_qkv: bool = False
    compile: bool = False
    compile_mode: str = "default"
    compile_cache_dir: Path | None = None

    @classmethod
    def resolve(
        cls,
        device: torch.device,
        *,
        channels_last: bool | None = None,
        fuse_qkv: bool | None = None,
        compile: bool = False,
        compile_mode: str = "default",
        compile_cache_dir: str | Path | None = None,
    ) -> SpeedSettings:
        """Unset layout options are on for CUDA only: on CPU they cost more than they save."""
        on_cuda = device.type == "cuda"
        return cls(
            channels_last=on_cuda if channels_last is None else channels_last,
            fuse_qkv=on_cuda if fuse_qkv is None else fuse_qkv,
            compile=compile,
            compile_mode=compile_mode,
            compile_cache_dir=Path(compile_cache_dir) if compile_cache_dir else None,
        )


def optimize_pipeline(pipeline: StableDiffusionXLPipeline, settings: SpeedSettings) -> None:
    """Apply `settings` to a loaded pipeline in place.

    Attention already runs through PyTorch's scaled_dot_product_attention (diffusers'
    default processor on torch 2); fusing swaps in its fused variant. Compiling is lazy:
    the first call of each new batch shape compiles (see GenerateImages.warm_up).
    """
    import torch

    if settings.fuse_qkv:
        pipeline.fuse_qkv_projections(unet=True, vae=True)
    if settings.channels_last:
        pipeline.unet.to(memory_format=torch.channels_last)
        pipeline.vae.to(memory_format=torch.channels_last)
    if settings.compile:
        use_compile_cache(settings.compile_cache_dir or default_compile_cache_dir())
        pipeline.unet.compile(mode=settings.compile_mode)
        pipeline.vae.decoder.compile(mode=settings.compile_mode)


def attention_processors(pipeline: StableDiffusionXLPipeline) -> set[str]:
    """The class names of every attention processor in the U-Net and the VAE."""
    return {
        type(processor).__name__
        for module in (pipeline.unet, pipeline.vae)
        for processor in module.attn_processors.values()
    }
