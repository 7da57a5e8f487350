"""The model presets: named KOALA models, their sampler settings, and the names a spec
may give `model.name`."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from koala_batch.compat import strip_protocol
from koala_batch.errors import ModelUnavailableError

TINY_MODEL_NAME = "tiny"


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


def local_model_path(name: str) -> str:
    """model.name with a local URL (file:///models/tiny, what fetch-model prints for a local
    copy) made the path it names; any other name unchanged."""
    protocol, _ = fsspec.core.split_protocol(name)
    if protocol in LOCAL_PROTOCOLS:
        return strip_protocol(LocalFileSystem, name)
    return name


LOCAL_PROTOCOLS = {"file", "local"}
