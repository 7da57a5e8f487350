"""Model preflight: every way model.name can fail to load is one line naming it and the fix."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

from koala_batch.errors import ModelUnavailableError, SpecError, UnsafeWeightsError, UsageError
from koala_batch.models.preflight import check_model
from koala_batch.presets import PRESETS
from koala_batch.spec import ModelSpec

REPO = "example-org/tiny-sdxl"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def model_dir(model_cache, tmp_path) -> Path:
    """A copy of the tiny model's diffusers directory, free to damage."""
    from koala_batch.models.tiny import ensure_tiny_model

    copy = tmp_path / "tiny-copy"
    shutil.copytree(ensure_tiny_model(model_cache), copy)
    return copy


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub pointed at an empty cache in tmp_path, offline unless a test says."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_snapshot(hub_cache: Path, model_dir: Path, repo: str = REPO) -> Path:
    """Lay `model_dir` out as the Hub cache holds a downloaded repository at main."""
    repo_folder = hub_cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_folder / "snapshots" / COMMIT
    shutil.copytree(model_dir, snapshot)
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(COMMIT)
    return snapshot


def failure(name: str, **fields) -> str:
    with pytest.raises(ModelUnavailableError) as caught:
        check_model(ModelSpec(name=name, **fields))
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, UsageError)
    return message


def test_the_tiny_model_is_always_there():
    assert "tiny" in check_model(ModelSpec(name="tiny"))


def test_a_complete_local_directory_passes(model_dir):
    assert str(model_dir) in check_model(ModelSpec(name=str(model_dir)))


def test_a_directory_without_model_index_is_named(model_dir):
    (model_dir / "model_index.json").unlink()
    message = failure(str(model_dir))
    assert str(model_dir) in message and "model_index.json" in message


def test_a_component_without_weights_is_named(model_dir):
    for weights in (model_dir / "unet").glob("*.safetensors"):
        weights.unlink()
    message = failure(str(model_dir))
    assert "unet" in message and "safetensors" in message
    assert "text_encoder" not in message  # the others are complete


def test_a_missing_component_folder_is_named(model_dir):
    shutil.rmtree(model_dir / "vae")
    message = failure(str(model_dir))
    assert "vae" in message


def test_a_variant_the_directory_lacks_is_named(model_dir):
    message = failure(str(model_dir), variant="fp16")
    assert "fp16" in message and "model.variant" in message


def test_pickle_only_weights_are_refused(model_dir):
    for weights in (model_dir / "vae").glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(UnsafeWeightsError, match="vae"):
        check_model(ModelSpec(name=str(model_dir)))


UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda data: data[: len(data) - 100], "where its header's tensors end at byte"),
        (lambda data: data[:5], "too short for the header it announces"),
        (lambda data: data[:8] + b"#" * (len(data) - 8), "is not a safetensors header"),
    ],
    ids=["truncated", "stub", "corrupt-header"],
)
def test_a_damaged_weights_file_is_named(model_dir, damage, why):
    weights = model_dir / UNET
    weights.write_bytes(damage(weights.read_bytes()))
    message = failure(str(model_dir))
    assert f"{weights} is damaged" in message and why in message


def test_a_fetched_copy_with_a_corrupt_file_of_the_right_size_is_caught(model_dir, tmp_path):
    from koala_batch.models.weights import fetch_model

    copy = tmp_path / "fetched"
    fetch_model(str(model_dir), str(copy))
    weights = copy / UNET
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8  # the header's first bytes: the manifest's size still holds
    weights.write_bytes(bytes(data))
    message = failure(str(copy))
    assert f"{weights} is damaged" in message


@pytest.mark.parametrize(
    ("typo", "preset"), [("koala-700", "koala-700m"), ("koala_1b", "koala-1b")]
)
def test_a_near_miss_of_a_preset_gets_a_suggestion(typo, preset):
    message = failure(typo)
    assert repr(typo) in message and f"did you mean {preset}?" in message


def test_a_path_that_does_not_exist_is_not_taken_for_a_hub_id(tmp_path):
    message = failure(str(tmp_path / "no" / "such" / "model"))
    assert "not a preset, an existing directory or a Hugging Face id" in message


def test_a_hub_model_in_the_cache_passes_offline(hub, model_dir):
    snapshot = cache_snapshot(hub, model_dir)
    assert str(snapshot) in check_model(ModelSpec(name=REPO))


def test_a_hub_model_not_in_the_cache_offline_names_the_fixes(hub):
    message = failure("koala-700m")
    assert "etri-vilab/koala-700m" in message and "HF_HUB_OFFLINE" in message
    assert str(hub) in message
    assert "koala-batch fetch-model koala-700m DEST" in message and "HF_HOME" in message


def test_a_partly_cached_hub_model_offline_is_refused(hub, model_dir):
    snapshot = cache_snapshot(hub, model_dir)
    for weights in (snapshot / "text_encoder_2").glob("*.safetensors"):
        weights.unlink()
    message = failure(REPO)
    assert "only partly" in message and REPO in message


def test_an_unreachable_hub_fails_fast_naming_it(hub, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    started = time.monotonic()
    message = failure("koala-lightning-1b")
    assert time.monotonic() - started < 30
    assert "etri-vilab/koala-lightning-1b" in message and "cannot be reached" in message
    assert endpoint in message and "fetch-model" in message


# ---------------------------------------------------------------------------------------
# A copy of a preset loads with the preset's sampler settings only through model.preset

LIGHTNING = "koala-lightning-700m"


@pytest.fixture
def lightning_copy(hub, model_dir, tmp_path) -> Path:
    """What `fetch-model koala-lightning-700m DEST` writes (the tiny weights under the
    preset's Hub id in the cache)."""
    from koala_batch.models.weights import fetch_model

    cache_snapshot(hub, model_dir, repo=PRESETS[LIGHTNING].source)
    dest = tmp_path / "lightning-copy"
    fetch_model(LIGHTNING, str(dest))
    return dest


@pytest.mark.parametrize("where", ["directory", "url"])
def test_a_copy_of_a_preset_without_model_preset_is_refused(lightning_copy, where):
    name = str(lightning_copy)
    if where == "url":
        import fsspec

        name = "memory://models/lightning"
        fsspec.filesystem("memory").put(str(lightning_copy), "/models/lightning", recursive=True)
    with pytest.raises(SpecError) as refused:
        check_model(ModelSpec(name=name))
    assert str(refused.value) == (
        f"model.name {name} is a copy of the preset {LIGHTNING}: set model.preset: "
        f"{LIGHTNING} so that its sampler settings apply (10 steps, guidance 3.5, trailing "
        "timesteps)"
    )
    model = ModelSpec(name=name, preset=LIGHTNING)
    check_model(model)
    assert (model.settings.steps, model.settings.guidance_scale) == (10, 3.5)


def test_model_preset_sets_the_scheduler_a_copy_is_loaded_with(lightning_copy):
    from koala_batch.models.loading import load_pipeline

    generic = load_pipeline(str(lightning_copy), device=torch.device("cpu"))
    preset = load_pipeline(str(lightning_copy), device=torch.device("cpu"), preset=LIGHTNING)
    assert generic.scheduler.config.timestep_spacing != "trailing"
    assert preset.scheduler.config.timestep_spacing == "trailing"


def test_a_presets_hub_id_takes_the_presets_settings_and_an_unknown_preset_is_refused():
    assert ModelSpec(name=PRESETS[LIGHTNING].source).settings == PRESETS[LIGHTNING]
    assert ModelSpec(name="someone/else").settings.steps == 25
    with pytest.raises(ValueError, match="'koala-2b' is not a preset"):
        ModelSpec(preset="koala-2b")
