"""Pipeline loading: a model name to a StableDiffusionXLPipeline on a device and dtype.

Every model, the tiny one included, is loaded the same way: with
`StableDiffusionXLPipeline.from_pretrained(..., use_safetensors=True)` from a local
directory or a Hugging Face id, with an explicit device and dtype.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from koala_batch.errors import UnsafeWeightsError
from koala_batch.models.tiny import default_cache_dir, ensure_tiny_model
from koala_batch.presets import PRESETS, TINY_MODEL_NAME, preset_for

if TYPE_CHECKING:  # torch and diffusers are heavy: import them where the model is built
    import torch
    from diffusers import StableDiffusionXLPipeline

logger = logging.getLogger(__name__)


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
