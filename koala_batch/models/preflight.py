"""Model preflight: before Ray starts, check that `model.name` can be loaded from here.

A model that cannot load otherwise surfaces only inside the generator actors, after the
cluster has started, as actor-construction failures. Here it is one line naming the
model and the fix, in seconds. The driver checks what the driver sees: on a cluster its
image and its Hugging Face cache are the workers' (the same container), and an
object-storage prefix is the same prefix everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from koala_batch.errors import ModelUnavailableError, SpecError
from koala_batch.models import weights
from koala_batch.models.loading import check_local_weights_are_safetensors, resolve_model_source
from koala_batch.models.weights import MODEL_INDEX
from koala_batch.presets import PRESETS, TINY_MODEL_NAME, check_model_name, did_you_mean
from koala_batch.spec import ModelSpec, reveal_storage_options

# How long the Hub may take to answer whether a repository exists.
HUB_TIMEOUT_S = 10.0
FETCH_HINT = (
    "fetch it where the Hub is reachable with `koala-batch fetch-model {name} DEST` "
    "(a local folder or an s3:// prefix) and set model.name to DEST"
)


def check_model(model: ModelSpec) -> str:
    """Where model.name will load from, in words; ModelUnavailableError if it cannot."""
    name = model.name
    if name == TINY_MODEL_NAME:
        return "the tiny random-weight model, built in code"
    if weights.is_remote_model(name):
        options = reveal_storage_options(model.storage_options)
        weights.check_remote_weights(name, options, variant=model.variant)
        storage = weights.open_weights(name, options)
        check_copy_preset(model, weights.read_weights_manifest(storage, name)[1])
        return f"{name} (a fetched copy, cached on each node)"
    source = resolve_model_source(name)
    directory = Path(source).expanduser()
    if directory.is_dir():
        check_local_model(model, directory)
        return f"the local directory {directory}"
    check_model_name(name)
    return check_hub_model(name, source, model.revision, model.variant)


def check_local_model(model: ModelSpec, directory: Path) -> None:
    """A local pipeline directory; for a copy fetch-model wrote, also its files' sizes as
    its manifest records them and model.preset where it copies a preset."""
    manifest = local_copy_manifest(directory)
    if manifest is not None:
        # Checked as a remote copy is: a file cut short names the fetch-model command
        # that repairs it.
        copy = str(directory)
        weights.check_copy_sizes(weights.open_weights(copy, None), copy, manifest)
    check_model_directory(directory, model.name, model.variant)
    if manifest is not None:
        check_copy_preset(model, manifest)


def local_copy_manifest(directory: Path) -> weights.WeightsManifest | None:
    """The weights manifest of a directory fetch-model wrote; None for any other one."""
    path = directory / weights.MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return weights.WeightsManifest.from_bytes(path.read_bytes())
    except (OSError, ValueError, KeyError):  # not fetch-model's: a directory like any other
        return None


def check_copy_preset(model: ModelSpec, manifest: weights.WeightsManifest) -> None:
    """A copy of a preset (its manifest says so) loads with that preset's sampler settings
    only through model.preset: without it the generic ones (25 steps, guidance 5.0, the
    copy's scheduler) would silently make other images than the preset does."""
    copied = manifest.source.get("name")
    if model.preset is not None or copied not in PRESETS or copied == TINY_MODEL_NAME:
        return
    preset = PRESETS[copied]
    spacing = (
        f", {preset.scheduler_timestep_spacing} timesteps"
        if (preset.scheduler_timestep_spacing)
        else ""
    )
    raise SpecError(
        f"model.name {model.name} is a copy of the preset {copied}: set model.preset: "
        f"{copied} so that its sampler settings apply ({preset.steps} steps, guidance "
        f"{preset.guidance_scale:g}{spacing})"
    )


def component_folders(index: dict[str, Any]) -> list[str]:
    """The pipeline components `model_index.json` names (entries of [library, class])."""
    return [
        key
        for key, value in index.items()
        if isinstance(value, list) and len(value) == 2 and value[0] is not None
    ]


def weight_files_missing(
    files_by_component: dict[str, list[str]], variant: str | None
) -> list[str]:
    """The components that hold a model (a `config.json`) but no safetensors weights of
    the variant asked for. Tokenizers and schedulers hold no weights."""
    return [
        component
        for component, files in files_by_component.items()
        if "config.json" in files
        and not any(weights.is_selected_weight(name, variant) for name in files)
    ]


def check_model_directory(directory: Path, name: str, variant: str | None) -> None:
    """A diffusers pipeline directory with safetensors weights for every model component."""
    index_path = directory / MODEL_INDEX
    if not index_path.is_file():
        raise ModelUnavailableError(
            f"model {name}: {directory} has no {MODEL_INDEX}, so it is not a diffusers "
            "pipeline directory; save one with `pipeline.save_pretrained(DIR)` or "
            f"`koala-batch fetch-model NAME DIR`"
        )
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"model {name}: cannot read {index_path}: {exc}") from exc
    check_local_weights_are_safetensors(directory)  # pickle-only weights: refused by name
    files = {
        component: sorted(p.name for p in (directory / component).iterdir())
        if (directory / component).is_dir()
        else []
        for component in component_folders(index)
    }
    absent = [component for component, listed in files.items() if not listed]
    if absent:
        raise ModelUnavailableError(
            f"model {name}: {directory} lacks the component folder(s) {', '.join(absent)} "
            f"that {MODEL_INDEX} names; copy the whole pipeline directory"
        )
    missing = weight_files_missing(files, variant)
    if missing:
        wanted = f"{variant} " if variant else ""
        raise ModelUnavailableError(
            f"model {name}: {directory} has no {wanted}safetensors weights for "
            f"{', '.join(missing)}" + ("; check model.variant" if variant else "")
        )
    check_weight_headers(directory, files, name, variant)


def check_weight_headers(
    directory: Path, files_by_component: dict[str, list[str]], name: str, variant: str | None
) -> None:
    """Each safetensors file the pipeline will load has a header that parses and the size
    it announces: a truncated or corrupt file fails here, naming it, not in every actor."""
    for component, files in files_by_component.items():
        for file_name in files:
            if not weights.is_selected_weight(file_name, variant):
                continue
            path = directory / component / file_name
            damage = weights.safetensors_damage(path)
            if damage is not None:
                raise ModelUnavailableError(
                    f"model {name}: {path} is damaged ({damage}); copy the model again"
                )


def check_hub_model(name: str, repo_id: str, revision: str | None, variant: str | None) -> str:
    """A Hub model: complete in the local cache, or the Hub says it exists."""
    import huggingface_hub
    from huggingface_hub import constants

    at = f"{repo_id}@{revision}" if revision else repo_id
    cached = huggingface_hub.try_to_load_from_cache(repo_id, MODEL_INDEX, revision=revision)
    if isinstance(cached, str):
        snapshot = Path(cached).parent
        try:
            check_model_directory(snapshot, name, variant)
            return f"the Hugging Face cache ({snapshot})"
        except ModelUnavailableError:
            if constants.is_offline_mode():
                raise ModelUnavailableError(
                    f"model {name} ({at}) is only partly in the Hugging Face cache "
                    f"{constants.HF_HUB_CACHE} and HF_HUB_OFFLINE is set; "
                    + FETCH_HINT.format(name=name)
                ) from None
    if constants.is_offline_mode():
        raise ModelUnavailableError(
            f"model {name} ({at}) is not in the Hugging Face cache {constants.HF_HUB_CACHE} "
            "and HF_HUB_OFFLINE is set; point HF_HOME at a cache that holds it, or "
            + FETCH_HINT.format(name=name)
        )
    return ask_the_hub(name, repo_id, revision, variant)


def ask_the_hub(name: str, repo_id: str, revision: str | None, variant: str | None) -> str:
    """The Hub's answer: the repository and revision exist and hold safetensors weights."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        raise ModelUnavailableError(
            f"model {name} ({at}) is gated on the Hub: accept its terms there and set HF_TOKEN, "
            "or " + FETCH_HINT.format(name=name)
        ) from None
    except RevisionNotFoundError:
        raise ModelUnavailableError(
            f"model {name}: the Hub has {repo_id} but no revision {revision!r}; "
            "check model.revision"
        ) from None
    except RepositoryNotFoundError:
        raise ModelUnavailableError(
            f"model {name}: the Hub has no repository {repo_id}{did_you_mean(name)} "
            "(a private one needs HF_TOKEN)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any network failure means the same to the user
        raise ModelUnavailableError(
            f"model {name} ({at}) is not in the Hugging Face cache {constants.HF_HUB_CACHE} "
            f"and the Hub at {constants.ENDPOINT} cannot be reached ({type(exc).__name__}); "
            "point HF_HOME at a cache that holds it, or " + FETCH_HINT.format(name=name)
        ) from None
    files: dict[str, list[str]] = {}
    for sibling in info.siblings or []:
        component, _, file_name = sibling.rfilename.partition("/")
        if file_name and "/" not in file_name:
            files.setdefault(component, []).append(file_name)
    top_level = {sibling.rfilename for sibling in info.siblings or []}
    if MODEL_INDEX not in top_level:
        raise ModelUnavailableError(
            f"model {name}: the Hub repository {at} has no {MODEL_INDEX}, so it is not a "
            "diffusers pipeline"
        )
    missing = weight_files_missing(files, variant)
    if missing:
        wanted = f"{variant} " if variant else ""
        raise ModelUnavailableError(
            f"model {name}: the Hub repository {at} has no {wanted}safetensors weights for "
            f"{', '.join(missing)}; koala-batch loads safetensors only"
            + ("; check model.variant" if variant else "")
        )
    return f"the Hugging Face Hub ({at}, downloaded into {constants.HF_HUB_CACHE})"
