"""Fetched copies of a model (koala_batch.models.weights): what fetch-model copies, its manifest,
and the per-node cache that downloads a copy once and checks every byte."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pytest

from koala_batch.cli import main as cli
from koala_batch.errors import EXIT_INVALID, ModelUnavailableError, UnsafeWeightsError
from koala_batch.models.tiny import ensure_tiny_model
from koala_batch.models.weights import (
    CACHE_FOLDER,
    MANIFEST_NAME,
    WeightsManifest,
    check_remote_weights,
    fetch_model,
    file_sha256,
    is_remote_model,
    is_selected_weight,
    local_copy,
)
from koala_batch.storage import Storage
from tests.conftest import REPO_ROOT, SAMPLE_PROMPTS

MODEL_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")


@pytest.fixture
def tiny_dir(model_cache, monkeypatch) -> Path:
    """The built tiny model; `tiny` resolves to it (KOALA_BATCH_CACHE)."""
    monkeypatch.setenv("KOALA_BATCH_CACHE", str(model_cache))
    return ensure_tiny_model(model_cache)


def memory_url() -> str:
    return f"memory://weights-{uuid.uuid4().hex[:8]}/models/tiny"


def files_under(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def read_manifest(directory: Path) -> WeightsManifest:
    return WeightsManifest.from_bytes((directory / MANIFEST_NAME).read_bytes())


# ---------------------------------------------------------------------------------------
# fetch_model


def test_fetch_tiny_copies_safetensors_configs_and_a_complete_manifest(tiny_dir, tmp_path):
    dest = tmp_path / "copy"
    result = fetch_model("tiny", str(dest))

    manifest = read_manifest(dest)
    listed = {entry.path: entry for entry in manifest.files}
    assert files_under(dest) == set(listed) | {MANIFEST_NAME}
    for path, entry in listed.items():
        assert (dest / path).stat().st_size == entry.size
        assert file_sha256(dest / path) == entry.sha256 == file_sha256(tiny_dir / path)
    assert all(path.endswith((".safetensors", ".json", ".txt")) for path in listed)
    for component in MODEL_COMPONENTS:
        assert any(p.startswith(f"{component}/") and p.endswith(".safetensors") for p in listed)
    # Every file the pipeline needs: the source directory, file for file.
    assert set(listed) == files_under(tiny_dir)
    assert {
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
        "model_index.json",
    } <= set(listed)
    assert manifest.source["name"] == "tiny" and manifest.source["variant"] is None
    assert (result.files, result.copied) == (len(listed), len(listed))
    assert result.total_size == sum(entry.size for entry in manifest.files)


def test_pickle_only_component_is_refused_by_name(tiny_dir, tmp_path):
    source = tmp_path / "pickled"
    shutil.copytree(tiny_dir, source)
    (source / "unet" / "diffusion_pytorch_model.safetensors").rename(
        source / "unet" / "diffusion_pytorch_model.bin"
    )
    with pytest.raises(UnsafeWeightsError, match=r"unet.*pickle weights only"):
        fetch_model(str(source), str(tmp_path / "dest"))
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize(
    ("file_name", "variant", "selected"),
    [
        ("diffusion_pytorch_model.safetensors", None, True),
        ("diffusion_pytorch_model-00001-of-00002.safetensors", None, True),
        ("diffusion_pytorch_model.fp16.safetensors", None, False),
        ("diffusion_pytorch_model.fp16.safetensors", "fp16", True),
        ("diffusion_pytorch_model.fp16-00001-of-00002.safetensors", "fp16", True),
        ("diffusion_pytorch_model.safetensors", "fp16", False),
        ("diffusion_pytorch_model.bin", None, False),
        ("diffusion_pytorch_model.fp16.bin", "fp16", False),
    ],
)
def test_is_selected_weight(file_name, variant, selected):
    assert is_selected_weight(file_name, variant) is selected


def test_a_variant_copies_only_its_weights_and_refuses_components_without_them(tiny_dir, tmp_path):
    source = tmp_path / "variants"
    shutil.copytree(tiny_dir, source)
    unet = source / "unet"
    shutil.copy(
        unet / "diffusion_pytorch_model.safetensors",
        unet / "diffusion_pytorch_model.fp16.safetensors",
    )

    fetch_model(str(source), str(tmp_path / "plain"))
    plain = read_manifest(tmp_path / "plain")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" not in {e.path for e in plain.files}
    with pytest.raises(ModelUnavailableError, match="no fp16 safetensors weights for") as lacking:
        fetch_model(str(source), str(tmp_path / "fp16"), variant="fp16")
    assert "text_encoder, text_encoder_2, vae;" in str(lacking.value)  # unet has them
    assert not (tmp_path / "fp16").exists()


def test_refetch_skips_files_already_right_and_repairs_a_damaged_one(tiny_dir, tmp_path):
    dest = tmp_path / "copy"
    first = fetch_model("tiny", str(dest))
    again = fetch_model("tiny", str(dest))
    assert again.copied == 0 and again.files == first.files

    damaged = dest / "unet" / "diffusion_pytorch_model.safetensors"
    damaged.write_bytes(b"truncated")
    repaired = fetch_model("tiny", str(dest))
    assert repaired.copied == 1
    assert file_sha256(damaged) == file_sha256(
        tiny_dir / "unet/diffusion_pytorch_model.safetensors"
    )

    # A manifest that records other bytes for a file: that file is copied again.
    manifest = json.loads((dest / MANIFEST_NAME).read_text())
    manifest["files"][0]["sha256"] = "0" * 64
    (dest / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert fetch_model("tiny", str(dest)).copied == 1


def test_fetch_of_a_url_or_an_unknown_directory_exits_2_with_one_line(tiny_dir, tmp_path, capsys):
    code = cli.main(["--log-format", "text", "fetch-model", "s3://bucket/model", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_INVALID
    assert "s3://bucket/model is a URL" in err and "\n" not in err


def test_cli_fetch_prints_one_summary_line(tiny_dir, tmp_path, capsys):
    dest = tmp_path / "copy"
    assert cli.main(["--log-format", "text", "fetch-model", "tiny", str(dest)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    files = len(read_manifest(dest).files)
    assert len(out) == 1
    assert f"{files} files" in out[0] and str(dest) in out[0] and f"{files} copied" in out[0]


def test_fetch_to_an_existing_file_exits_2_naming_it(tiny_dir, tmp_path, capsys):
    in_the_way = tmp_path / "file"
    in_the_way.write_text("mine")

    code = cli.main(["--log-format", "text", "fetch-model", "tiny", str(in_the_way)])

    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_INVALID
    assert line.startswith(f"koala-batch: error: destination file://{in_the_way} cannot be")
    assert "a file stands where a directory is needed: choose another dest" in line
    assert in_the_way.read_text() == "mine"


def test_fetch_of_a_typo_of_a_preset_suggests_it_without_asking_the_hub(
    tmp_path, capsys, monkeypatch
):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the Hub's answer would differ
    code = cli.main(["--log-format", "text", "fetch-model", "koala-700", str(tmp_path / "d")])

    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_INVALID
    assert "'koala-700' is not a preset" in line and "(did you mean koala-700m?)" in line
    assert not (tmp_path / "d").exists()


def test_the_model_name_fetch_model_prints_passes_preflight(tiny_dir, tmp_path, capsys):
    from koala_batch.models.preflight import check_model
    from koala_batch.spec import ModelSpec

    dest = tmp_path / "copy"
    assert cli.main(["--log-format", "text", "fetch-model", "tiny", str(dest)]) == 0
    printed = capsys.readouterr().out.split("model.name: ")[1].split()[0]
    assert printed == f"file://{dest}"

    assert str(dest) in check_model(ModelSpec(name=printed))


def test_validate_catches_a_truncated_unet_in_a_fetched_copy(tiny_dir, tmp_path, capsys):
    dest = tmp_path / "copy"
    fetch_model("tiny", str(dest))
    unet = dest / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 2])
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"input: {{uri: {SAMPLE_PROMPTS}}}\nmodel: {{name: {dest}}}\n"
        f"output: {{uri: {tmp_path / 'out'}}}\n"
    )

    code = cli.main(["--log-format", "text", "validate", str(spec)])

    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_INVALID
    assert f"model {dest} is damaged" in line and "unet/diffusion_pytorch_model" in line
    assert f"fetch-model tiny {dest}" in line


# ---------------------------------------------------------------------------------------
# The Hub path, offline, from a Hugging Face cache laid out on disk


def fake_hub_cache(hf_home: Path, repo_id: str, model_dir: Path) -> str:
    """The Hub cache layout: blobs by hash, a snapshot of symlinks, refs/main -> commit."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        blob = repo / "blobs" / file_sha256(path)
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, blob)
        link = snapshot / path.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_fetch_a_hub_id_offline_from_the_hugging_face_cache(tiny_dir, tmp_path):
    source = tmp_path / "hub-model"
    shutil.copytree(tiny_dir, source)
    unet = source / "unet"
    shutil.copy(
        unet / "diffusion_pytorch_model.safetensors",
        unet / "diffusion_pytorch_model.fp16.safetensors",
    )
    hf_home = tmp_path / "hf-home"
    commit = fake_hub_cache(hf_home, "org/name", source)
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "KOALA_BATCH_CACHE": str(tmp_path / "empty-cache"),
    }
    env.pop("HF_HUB_CACHE", None)
    command = [sys.executable, "-m", "koala_batch.cli.main", "--log-format", "text", "fetch-model"]

    dest = tmp_path / "copy"
    done = subprocess.run(
        [*command, "org/name", str(dest)], env=env, cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(dest)
    assert manifest.source == {
        "name": "org/name",
        "id": "org/name",
        "revision": None,
        "commit": commit,
        "variant": None,
    }
    assert {e.path for e in manifest.files} == files_under(tiny_dir)  # the fp16 file left out
    assert all(not (dest / e.path).is_symlink() for e in manifest.files)
    for entry in manifest.files:
        assert file_sha256(dest / entry.path) == entry.sha256 == file_sha256(tiny_dir / entry.path)

    missing = subprocess.run(
        [*command, "org/missing", str(tmp_path / "none")],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == EXIT_INVALID
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1, missing.stderr
    assert "org/missing" in lines[0] and "(HF_HUB_OFFLINE is set)" in lines[0]
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------------------------------
# Loading a fetched copy: the driver's check and the per-node cache


@pytest.mark.parametrize(
    ("name", "remote"),
    [
        ("s3://bucket/models/koala-700m/", True),
        ("gs://bucket/m", True),
        ("memory://m", True),
        ("file:///models/tiny", False),
        ("/models/tiny", False),
        ("./models/tiny", False),
        ("tiny", False),
        ("etri-vilab/koala-700m", False),
    ],
)
def test_is_remote_model(name, remote):
    assert is_remote_model(name) is remote


def test_check_remote_weights_names_the_url_and_the_fix(tiny_dir):
    empty = memory_url()
    with pytest.raises(ModelUnavailableError, match="holds no fetched model") as missing:
        check_remote_weights(empty)
    message = str(missing.value)
    assert empty in message and "koala-batch fetch-model NAME" in message
    assert missing.value.exit_code == EXIT_INVALID

    url = memory_url()
    fetch_model("tiny", url)
    check_remote_weights(url)  # complete: no error
    with pytest.raises(ModelUnavailableError, match="holds the plain weights, not the fp16"):
        check_remote_weights(url, variant="fp16")

    fs, root = fsspec.core.url_to_fs(url)
    fs.rm_file(f"{root}/vae/config.json")
    with pytest.raises(
        ModelUnavailableError, match=r"damaged: 1 of its .*\(vae/config.json\)"
    ) as bad:
        check_remote_weights(url)
    assert f"koala-batch fetch-model tiny {url}" in str(bad.value)

    fs.pipe_file(f"{root}/{MANIFEST_NAME}", b"{not json")
    with pytest.raises(ModelUnavailableError, match="is not a koala-batch weights manifest"):
        check_remote_weights(url)
    with pytest.raises(ModelUnavailableError, match="cannot be opened"):
        check_remote_weights("nosuchprotocol://bucket/model")


def test_local_copy_loads_as_the_pipeline_fetched(tiny_dir, tmp_path):
    import torch

    from koala_batch.models.loading import load_pipeline

    url = memory_url()
    fetch_model("tiny", url)
    copy = local_copy(url, cache_dir=tmp_path)
    assert copy.parent == tmp_path / CACHE_FOLDER
    loaded = load_pipeline(str(copy), dtype="float32", device=torch.device("cpu"))
    original = load_pipeline(str(tiny_dir), dtype="float32", device=torch.device("cpu"))
    for name, tensor in original.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], tensor), name


def test_concurrent_local_copies_download_once_and_leave_no_temp_dirs(
    tiny_dir, tmp_path, monkeypatch
):
    url = memory_url()
    fetch_model("tiny", url)
    downloads: list[str] = []
    lock = threading.Lock()
    download_file = Storage.download_file

    def counting(self, relative, local_path):
        with lock:
            downloads.append(relative)
        time.sleep(0.01)  # widens the window in which unlocked copies would overlap
        download_file(self, relative, local_path)

    monkeypatch.setattr(Storage, "download_file", counting)
    with ThreadPoolExecutor(4) as pool:
        copies = list(pool.map(lambda _: local_copy(url, cache_dir=tmp_path), range(4)))

    manifest = read_manifest(copies[0])
    assert len(set(copies)) == 1
    assert sorted(downloads) == sorted(entry.path for entry in manifest.files)  # once each
    cache = tmp_path / CACHE_FOLDER
    key = copies[0].name
    assert {p.name for p in cache.iterdir()} == {key, f"{key}.lock"}
    assert files_under(copies[0]) == {e.path for e in manifest.files} | {MANIFEST_NAME}

    local_copy(url, cache_dir=tmp_path)
    assert len(downloads) == len(manifest.files)  # a cached copy is reused

    # A download killed midway leaves its staging folder; the next download removes it.
    shutil.rmtree(copies[0])
    (cache / f".{key}-download-killed").mkdir()
    assert local_copy(url, cache_dir=tmp_path) == copies[0]
    assert {p.name for p in cache.iterdir()} == {key, f"{key}.lock"}


def test_a_checksum_mismatch_names_the_file_and_caches_nothing(tiny_dir, tmp_path):
    url = memory_url()
    fetch_model("tiny", url)
    fs, root = fsspec.core.url_to_fs(url)
    target = f"{root}/unet/diffusion_pytorch_model.safetensors"
    data = bytearray(fs.cat_file(target))
    data[-1] ^= 0xFF  # same size, other bytes
    fs.pipe_file(target, bytes(data))

    with pytest.raises(
        ModelUnavailableError,
        match=r"damaged: unet/diffusion_pytorch_model\.safetensors has sha256",
    ):
        local_copy(url, cache_dir=tmp_path)
    entries = list((tmp_path / CACHE_FOLDER).iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".lock"  # no copy, no staging folder


def test_a_generator_loads_model_name_url_with_its_secret_storage_options(
    tiny_dir, tmp_path, monkeypatch
):
    from types import SimpleNamespace

    import torch
    from diffusers import StableDiffusionXLPipeline

    from koala_batch.stages.generate import GenerateImages
    from tests.unit.conftest import make_spec

    url = memory_url()
    fetch_model("tiny", url)
    monkeypatch.setenv("KOALA_BATCH_CACHE", str(tmp_path))
    spec = make_spec(tmp_path / "out", model={"name": url, "storage_options": {"key": "k-123"}})
    assert spec.snapshot()["model"]["storage_options"] == {"key": "**********"}
    pipeline = GenerateImages.load_model(SimpleNamespace(device=torch.device("cpu")), spec)
    assert isinstance(pipeline, StableDiffusionXLPipeline)
    assert len([p for p in (tmp_path / CACHE_FOLDER).iterdir() if p.is_dir()]) == 1
