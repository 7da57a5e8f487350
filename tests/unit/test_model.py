"""The tiny model, its tokenizer and pipeline loading (safetensors only, explicit device/dtype)."""

from __future__ import annotations

import ast
import inspect
import shutil
from pathlib import Path

import numpy as np
import pytest

from koala_batch.errors import UnsafeWeightsError
from koala_batch.models import loading as model
from koala_batch.models import tiny
from koala_batch.models.loading import load_pipeline
from koala_batch.models.tiny import build_clip_tokenizer, ensure_tiny_model
from koala_batch.presets import PRESETS, preset_for

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("tiny-cache")
    ensure_tiny_model(cache)
    return cache


@pytest.fixture(scope="module")
def pipeline(tiny_cache):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is fastest, and robust on a busy machine
    yield load_pipeline("tiny", cache_dir=tiny_cache)
    torch.set_num_threads(threads)


def generate(pipeline, seed: int, prompt: str = "a red cube") -> np.ndarray:
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.inference_mode():
        result = pipeline(
            prompt=[prompt],
            num_inference_steps=2,
            guidance_scale=5.0,
            width=64,
            height=64,
            generator=[generator],
            output_type="np",
        )
    return np.asarray(result.images)


# ---------------------------------------------------------------------------------------
# Tokenizer


def test_end_of_text_has_the_highest_id():
    tokenizer = build_clip_tokenizer()
    vocab = tokenizer.get_vocab()
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert end == max(vocab.values())
    assert end == len(tokenizer) - 1
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == end


def test_tokenizer_limit_is_77():
    tokenizer = build_clip_tokenizer()
    assert tokenizer.model_max_length == 77
    ids = tokenizer("x" * 200, padding="max_length", truncation=True).input_ids
    assert len(ids) == 77


def test_tokenizer_wraps_text_in_start_and_end_and_end_is_the_argmax():
    tokenizer = build_clip_tokenizer()
    ids = tokenizer("a cat ÿ 日本").input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|startoftext|>")
    assert ids[-1] == tokenizer.eos_token_id
    assert int(np.argmax(ids)) == len(ids) - 1  # CLIP pools here


def test_tokenizer_handles_any_bytes_and_counts_them():
    tokenizer = build_clip_tokenizer()
    short = tokenizer("ab", truncation=False).input_ids
    longer = tokenizer("ab" * 100, truncation=False, verbose=False).input_ids
    assert len(longer) > 77 > len(short)
    # Byte level: every UTF-8 byte is one known token (2 + 3 + 4 bytes), none unknown.
    ids = tokenizer("ü€😀", truncation=False).input_ids
    assert len(ids) == 2 + 9
    assert tokenizer.eos_token_id not in ids[1:-1]
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) != [tokenizer.unk_token] * 9


# ---------------------------------------------------------------------------------------
# The tiny model on disk


def test_tiny_model_is_saved_as_safetensors_only(tiny_cache):
    target = ensure_tiny_model(tiny_cache)

    assert target.parent == tiny_cache
    assert (target / "model_index.json").is_file()
    files = [p for p in target.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert not [p for p in files if p.name.endswith(PICKLE_SUFFIXES)]
    # No staging directory left behind.
    assert [p.name for p in tiny_cache.iterdir()] == [target.name]


def test_second_call_reuses_the_built_model(tiny_cache, monkeypatch):
    target = ensure_tiny_model(tiny_cache)
    before = {p: p.stat().st_mtime_ns for p in target.rglob("*") if p.is_file()}

    def must_not_build(*args, **kwargs):
        raise AssertionError("the tiny model was built again")

    # A sentinel for the builder (not the function under test): reuse must not call it.
    monkeypatch.setattr(tiny, "build_tiny_pipeline", must_not_build)
    assert ensure_tiny_model(tiny_cache) == target
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*") if p.is_file()} == before


def test_tiny_model_builds_are_seeded(tiny_cache, tmp_path):
    other = ensure_tiny_model(tmp_path)
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (other / name).read_bytes() == (ensure_tiny_model(tiny_cache) / name).read_bytes()


# ---------------------------------------------------------------------------------------
# Loading and generating


def test_load_tiny_pipeline_on_cpu_float32(pipeline):
    import torch
    from diffusers import StableDiffusionXLPipeline

    assert isinstance(pipeline, StableDiffusionXLPipeline)
    assert pipeline.device.type == "cpu"
    for component in (pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2):
        assert component.dtype == torch.float32
        assert next(component.parameters()).device.type == "cpu"


def test_tiny_pipeline_generates_64px_images(pipeline):
    images = generate(pipeline, seed=1)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_same_seed_same_image_other_seed_other_image(pipeline):
    first = generate(pipeline, seed=1)
    again = generate(pipeline, seed=1)
    other = generate(pipeline, seed=2)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_explicit_dtype_is_honoured(tiny_cache):
    import torch

    pipeline = load_pipeline(
        "tiny", dtype="bfloat16", device=torch.device("cpu"), cache_dir=tiny_cache
    )
    assert pipeline.unet.dtype == torch.bfloat16


def test_pickle_only_component_is_refused(tiny_cache, tmp_path):
    source = ensure_tiny_model(tiny_cache)
    unsafe = tmp_path / "unsafe-model"
    shutil.copytree(source, unsafe)
    unet = unsafe / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")

    with pytest.raises(UnsafeWeightsError) as info:
        load_pipeline(str(unsafe), cache_dir=tiny_cache)
    assert str(unet) in str(info.value)
    assert "diffusion_pytorch_model.bin" in str(info.value)


def test_local_model_directory_loads(tiny_cache, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    copy = tmp_path / "my-model"
    shutil.copytree(ensure_tiny_model(tiny_cache), copy)
    assert isinstance(load_pipeline(str(copy)), StableDiffusionXLPipeline)


def test_local_directory_without_model_index_is_refused(tmp_path):
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        load_pipeline(str(tmp_path / "empty-model"))


# ---------------------------------------------------------------------------------------
# Loading code never runs remote code


def from_pretrained_calls(source: str) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "from_pretrained"
    ]


def test_model_code_never_enables_remote_code():
    source = inspect.getsource(model)
    assert "trust_remote_code" not in source
    assert "custom_pipeline" not in source
    calls = from_pretrained_calls(source)
    assert calls, "load_pipeline should call from_pretrained"
    for call in calls:
        keywords = {kw.arg for kw in call.keywords}
        assert None not in keywords  # no **kwargs that could smuggle options in
        assert not keywords & {"trust_remote_code", "custom_pipeline", "custom_revision"}


def test_model_loads_with_use_safetensors_true():
    call = from_pretrained_calls(inspect.getsource(model.load_pipeline))[0]
    keywords = {kw.arg: kw.value for kw in call.keywords}
    assert isinstance(keywords["use_safetensors"], ast.Constant)
    assert keywords["use_safetensors"].value is True


# ---------------------------------------------------------------------------------------
# Presets


def test_presets():
    assert preset_for("koala-lightning-700m").steps == 10
    assert preset_for("koala-lightning-1b").guidance_scale == 3.5
    assert preset_for("koala-lightning-700m").scheduler_timestep_spacing == "trailing"
    assert preset_for("koala-700m").steps == 25
    # A preset's Hub id is that preset (its repository's scheduler is not the lightning one)
    assert preset_for("etri-vilab/koala-lightning-1b").name == "koala-lightning-1b"
    assert preset_for("someone/sdxl-finetune").name == "custom"
    assert preset_for("/models/a-copy", "koala-lightning-700m").steps == 10
    assert PRESETS["koala-1b"].source == "etri-vilab/koala-1b"


# ---------------------------------------------------------------------------------------
# Speed settings: dtype of the decoder, layout, fusion, compilation


def test_float16_vae_that_needs_upcasting_decodes_in_bfloat16_on_cuda_else_float32(
    pipeline, monkeypatch
):
    import torch

    vae = pipeline.vae
    assert vae.config.force_upcast  # the tiny VAE is configured like SDXL's
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert model.decode_dtype(torch.float16, vae, cpu) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert model.decode_dtype(torch.float16, vae, cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert model.decode_dtype(torch.float16, vae, cuda) == torch.float32
    # Other dtypes decode as they are.
    assert model.decode_dtype(torch.bfloat16, vae, cuda) == torch.bfloat16
    assert model.decode_dtype(torch.float32, vae, cpu) == torch.float32


def test_auto_dtype_is_bfloat16_on_cuda_and_float32_on_cpu():
    import torch

    assert model.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert model.resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_layout_options_default_to_cuda_only():
    import torch

    on_cpu = model.SpeedSettings.resolve(torch.device("cpu"))
    on_cuda = model.SpeedSettings.resolve(torch.device("cuda"))
    forced = model.SpeedSettings.resolve(torch.device("cpu"), channels_last=True, fuse_qkv=True)

    assert (on_cpu.channels_last, on_cpu.fuse_qkv, on_cpu.compile) == (False, False, False)
    assert (on_cuda.channels_last, on_cuda.fuse_qkv) == (True, True)
    assert (forced.channels_last, forced.fuse_qkv) == (True, True)


def test_attention_runs_through_sdpa(pipeline):
    assert model.attention_processors(pipeline) == {"AttnProcessor2_0"}


def test_fused_projections_and_channels_last_keep_the_images(tiny_cache):
    import torch

    plain = load_pipeline("tiny", cache_dir=tiny_cache)
    fast = load_pipeline("tiny", cache_dir=tiny_cache)
    model.optimize_pipeline(fast, model.SpeedSettings(channels_last=True, fuse_qkv=True))

    assert model.attention_processors(fast) == {"FusedAttnProcessor2_0"}
    conv = fast.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    # Same arithmetic in another order: equal to float32 rounding, not bit for bit.
    assert np.abs(generate(plain, 5) - generate(fast, 5)).max() < 1e-3


def test_compile_compiles_unet_and_decoder_with_the_cache_on_local_disk(
    tiny_cache, tmp_path, monkeypatch
):
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.setenv(name, "")  # so that monkeypatch removes what the code sets
        monkeypatch.delenv(name)
    pipeline = load_pipeline("tiny", cache_dir=tiny_cache)

    model.optimize_pipeline(
        pipeline, model.SpeedSettings(compile=True, compile_cache_dir=tmp_path / "compiled")
    )

    assert pipeline.unet._compiled_call_impl is not None
    assert pipeline.vae.decoder._compiled_call_impl is not None
    assert model.os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compiled" / "inductor")
    assert model.os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "compiled" / "triton")
