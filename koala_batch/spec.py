"""The job spec: a strict pydantic model loaded from YAML, with `--set a.b=value` overrides."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from koala_batch.errors import SpecError
from koala_batch.presets import PRESETS, ModelPreset, local_model_path, preset_for
from koala_batch.schemas import READ_COLUMNS, RESERVED_COLUMNS, Col

__all__ = ["JobSpec", "SpecError", "load_spec", "spec_from_dict"]


@dataclass(frozen=True)
class RowParameter:
    """The bounds of a generation parameter, for the spec's value and a row's alike, and
    the rule a row's value must meet (what `validate` and planning apply)."""

    low: float
    high: float
    whole: bool = True
    multiple: int = 1

    def parse(self, value: Any) -> tuple[Any, str | None]:
        """(value, None) for a usable value, (None, reason) for a bad one, (None, None) for
        null (the spec's value applies)."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None, None
        kind = "an integer" if self.whole else "a number"
        if isinstance(value, bool | str | bytes):
            return None, f"value {value!r} is not {kind}"
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            return None, f"value {value!r} is not {kind}"
        if not math.isfinite(number):
            return None, f"value {value!r} is not {kind}"
        if self.whole:
            if number != int(number):
                return None, f"value {value!r} is not a whole number"
            number = int(value) if isinstance(value, int) else int(number)
        bounds = f"{self.low:g} to {self.high:g}"
        if not self.low <= number <= self.high:
            return None, f"value {value!r} is outside {bounds}"
        if self.multiple > 1 and number % self.multiple:
            return None, f"value {value!r} is not a multiple of {self.multiple}"
        return number, None


STEPS_RULE = RowParameter(1, 1000)
GUIDANCE_SCALE_RULE = RowParameter(0.0, 100.0, whole=False)
SIDE_RULE = RowParameter(8, 8192, multiple=8)  # width and height
IMAGES_PER_PROMPT_RULE = RowParameter(1, 1000)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


StorageOptionValue = Annotated[
    str | bool | int | float | None | dict[str, Any] | SecretStr, Field(union_mode="left_to_right")
]

SECRET_OPTION_NAMES = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "aws_secret_access_key",
        "aws_session_token",
        "session_token",
        "secret_key",
        "access_key",
        "aws_access_key_id",
        "sas_token",
        "account_key",
        "client_secret",
    }
)


def _secret_storage_options(value: dict[str, Any]) -> dict[str, Any]:
    """Wrap credential-looking storage options in SecretStr, however they were given."""
    wrapped: dict[str, Any] = {}
    for name, option in value.items():
        if name.lower() in SECRET_OPTION_NAMES and isinstance(option, (str, int, float)):
            # YAML reads an all-digit credential as a number: it is still a credential.
            wrapped[name] = SecretStr(str(option))
        elif isinstance(option, dict):
            wrapped[name] = _secret_storage_options(option)
        else:
            wrapped[name] = option
    return wrapped


def reveal_storage_options(options: dict[str, Any]) -> dict[str, Any]:
    """Storage options with secrets unwrapped, for handing to fsspec (never for logging)."""
    revealed: dict[str, Any] = {}
    for name, option in options.items():
        if isinstance(option, SecretStr):
            revealed[name] = option.get_secret_value()
        elif isinstance(option, dict):
            revealed[name] = reveal_storage_options(option)
        else:
            revealed[name] = option
    return revealed


class InputSpec(_Section):
    """Where the prompt table is and which columns mean what."""

    uri: str | list[str] = Field(
        description="Parquet file, directory/prefix, glob, or a list of these; local path "
        "or any fsspec URL (s3://, gs://, ...)."
    )
    prompt_column: str = Field("prompt", description="Column holding the text prompt.")
    id_column: str | None = Field(
        None,
        description="Column holding a unique row id. Without it, the id is derived from "
        "the file path and row index.",
    )
    negative_prompt_column: str | None = Field(
        None,
        description="Optional per-row negative prompt; null rows use generation.negative_prompt.",
    )
    seed_column: str | None = Field(
        None,
        description="Optional per-row seed, 0 to 2**63-1; image k of a row uses seed+k. Null "
        "rows use the seed derived from generation.seed; other values make error rows.",
    )
    steps_column: str | None = Field(
        None,
        description="Optional per-row denoising steps (1 to 1000); null rows use "
        "generation.steps. A bad value makes the row an error row naming the column.",
    )
    guidance_scale_column: str | None = Field(
        None,
        description="Optional per-row guidance scale (0 to 100); null rows use "
        "generation.guidance_scale. A bad value makes the row an error row.",
    )
    width_column: str | None = Field(
        None,
        description="Optional per-row image width (8 to 8192, a multiple of 8); null rows "
        "use generation.width. A bad value makes the row an error row.",
    )
    height_column: str | None = Field(
        None,
        description="Optional per-row image height (8 to 8192, a multiple of 8); null rows "
        "use generation.height. A bad value makes the row an error row.",
    )
    images_per_prompt_column: str | None = Field(
        None,
        description="Optional per-row number of images (1 to 1000); null rows use "
        "generation.images_per_prompt. A bad value makes one error row for the row.",
    )
    passthrough_columns: list[str] = Field(
        default_factory=list, description="Input columns copied unchanged into the manifest."
    )
    storage_options: dict[str, StorageOptionValue] = Field(
        default_factory=dict,
        description="fsspec options for the input filesystem (endpoint_url, key, secret, ...). "
        "Credentials are kept as secrets.",
    )

    @field_validator("storage_options", mode="after")
    @classmethod
    def _hide_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _secret_storage_options(value)

    @property
    def uris(self) -> list[str]:
        return [self.uri] if isinstance(self.uri, str) else list(self.uri)

    @property
    def parameter_columns(self) -> dict[str, str | None]:
        """The per-row generation parameter columns, by their spec field name."""
        return {
            "steps_column": self.steps_column,
            "guidance_scale_column": self.guidance_scale_column,
            "width_column": self.width_column,
            "height_column": self.height_column,
            "images_per_prompt_column": self.images_per_prompt_column,
        }

    @model_validator(mode="after")
    def _columns_are_distinct(self) -> InputSpec:
        if isinstance(self.uri, list) and not self.uri:
            raise ValueError("input.uri: the list of inputs is empty")
        clash = sorted(set(self.passthrough_columns) & RESERVED_COLUMNS)
        if clash:
            raise ValueError(
                f"input.passthrough_columns: {clash} clash with columns koala-batch writes "
                "(manifest or internal columns of the same name); leave them out or rename "
                "them in the input"
            )
        roles = {
            "prompt_column": self.prompt_column,
            "id_column": self.id_column,
            "negative_prompt_column": self.negative_prompt_column,
            "seed_column": self.seed_column,
            **self.parameter_columns,
        }
        for role, column in roles.items():
            if column in READ_COLUMNS:
                # The read stage adds these next to the input columns it reads.
                raise ValueError(
                    f"input.{role}: {column!r} is a name koala-batch gives its own "
                    f"provenance columns ({', '.join(READ_COLUMNS)}); rename it in the input"
                )
        return self


class ModelSpec(_Section):
    """Which pipeline to load and how."""

    name: str = Field(
        "tiny",
        description="Preset (koala-700m, koala-1b, koala-lightning-700m, koala-lightning-1b, "
        "tiny), a local diffusers directory, a Hugging Face id, or the fsspec URL of a copy "
        "made by `koala-batch fetch-model` (s3://bucket/models/koala-700m/): downloaded once "
        "per node into the koala-batch cache, checksums verified. A file:// URL is taken as "
        "the local path it names.",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights dtype; auto = bfloat16 on CUDA, float32 on CPU."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    variant: str | None = Field(None, description="Weights variant, e.g. fp16.")
    preset: str | None = Field(
        None,
        description="The preset whose sampler settings (steps, guidance, scheduler) apply "
        "when model.name is a copy of it (a directory or a fetch-model URL); a preset's "
        "name or Hugging Face id in model.name implies it.",
    )
    storage_options: dict[str, StorageOptionValue] = Field(
        default_factory=dict,
        description="fsspec options for a model.name URL (endpoint_url, key, secret, ...). "
        "Credentials are kept as secrets.",
    )

    @field_validator("storage_options", mode="after")
    @classmethod
    def _hide_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _secret_storage_options(value)

    @field_validator("name")
    @classmethod
    def _local_url_as_path(cls, value: str) -> str:
        # fetch-model names a local copy by its file:// URL; everything that loads, checks
        # or records model.name takes the path.
        return local_model_path(value)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in PRESETS:
            raise ValueError(f"{value!r} is not a preset ({', '.join(PRESETS)})")
        return value

    @property
    def settings(self) -> ModelPreset:
        """The sampler settings that apply: model.preset's, model.name's preset, or generic."""
        return preset_for(self.name, self.preset)


class GenerationSpec(_Section):
    """Sampler settings; unset steps/guidance take the preset's recommendation."""

    steps: int | None = Field(
        None, ge=STEPS_RULE.low, le=STEPS_RULE.high, description="Denoising steps."
    )
    guidance_scale: float | None = Field(
        None,
        ge=GUIDANCE_SCALE_RULE.low,
        le=GUIDANCE_SCALE_RULE.high,
        description="Classifier-free guidance scale.",
    )
    width: int = Field(
        1024,
        ge=SIDE_RULE.low,
        le=SIDE_RULE.high,
        description="Image width in pixels (multiple of 8).",
    )
    height: int = Field(
        1024,
        ge=SIDE_RULE.low,
        le=SIDE_RULE.high,
        description="Image height in pixels (multiple of 8).",
    )
    negative_prompt: str | None = Field(None, description="Negative prompt for every row.")
    images_per_prompt: int = Field(
        1,
        ge=IMAGES_PER_PROMPT_RULE.low,
        le=IMAGES_PER_PROMPT_RULE.high,
        description="Images generated per row.",
    )
    seed: int = Field(
        0,
        ge=0,
        lt=2**63,
        description="Job seed; with the row id and image index it fixes each image.",
    )
    guidance_cutoff: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Stop classifier-free guidance after this fraction of the steps (the "
        "SDXL CFG cut-off): later steps run the U-Net on one latent instead of two. Faster; "
        "changes the images. Unset = guide every step.",
    )
    deep_cache_interval: int | None = Field(
        None,
        ge=2,
        le=50,
        description="DeepCache: run the whole U-Net every N steps and, in between, only its "
        "outermost blocks, reusing the deeper features. Faster; changes the images. "
        "Unset = off.",
    )

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % SIDE_RULE.multiple:
            raise ValueError(f"must be a multiple of {SIDE_RULE.multiple} (got {value})")
        return value


class ActorRange(_Section):
    """An autoscaling actor pool size."""

    min: int = Field(ge=1, description="Smallest pool size.")
    max: int = Field(ge=1, description="Largest pool size.")

    @model_validator(mode="after")
    def _ordered(self) -> ActorRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class ComputeSpec(_Section):
    """Ray cluster and stage sizing."""

    ray_address: str | None = Field(
        None,
        description="Ray cluster to join (else $RAY_ADDRESS, else a local cluster is started).",
    )
    batch_size: int = Field(4, ge=1, le=4096, description="Prompts per pipeline call.")
    actors: int | ActorRange = Field(
        1, description="Generator actor count, or {min, max} to autoscale."
    )
    num_gpus_per_actor: float | Literal["auto"] = Field(
        "auto",
        description="GPUs per generator actor; auto = 1 when the cluster has GPUs, else 0.",
    )
    num_cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per generator actor.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per actor (CPU runs); default = num_cpus_per_actor."
    )
    encode_threads: int | None = Field(
        None,
        ge=1,
        description="Threads per generator actor encoding its images (PNG and WebP "
        "compression runs in parallel); default = num_cpus_per_actor, at least 1.",
    )
    max_task_retries: int | None = Field(
        None,
        ge=-1,
        description="Retries of a read, encode, write or generate task lost to a system "
        "failure (dead worker or node); -1 = unlimited. Unset keeps Ray Data's default "
        "(unlimited).",
    )
    max_actor_restarts: int | None = Field(
        None,
        ge=-1,
        description="Restarts of a generator actor whose process died; -1 = unlimited. Unset "
        "keeps Ray Data's default (unlimited).",
    )
    local_num_cpus: int | None = Field(
        None,
        ge=1,
        description="Logical CPUs of a local Ray cluster; default max(4, 2 x cores) so read "
        "and write tasks are never starved by the actors.",
    )
    local_object_store_mb: int = Field(
        512, ge=75, description="Object store size of a local Ray cluster, in MiB."
    )
    actor_placement_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Seconds to wait for a cluster joined by address to make room for the "
        "minimum of generator actors (an autoscaler may add nodes meanwhile) before the job "
        "gives up; a local cluster started by the job is checked at once.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the U-Net and the VAE decoder, warmed up before the first "
        "batch; compiled code is cached on local disk so a restarted actor reuses it.",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        "default", description="torch.compile mode when compute.compile is set."
    )
    compile_cache_dir: str | None = Field(
        None,
        description="Local directory for torch.compile's caches; default "
        "$KOALA_BATCH_CACHE/torch-compile (else ~/.cache/koala-batch/torch-compile).",
    )
    channels_last: bool | None = Field(
        None,
        description="U-Net and VAE in channels-last memory format; unset = on CUDA only.",
    )
    fuse_qkv: bool | None = Field(
        None,
        description="Fuse each attention's query/key/value projections into one matmul; "
        "unset = on CUDA only.",
    )
    gpu_hour_cost: float | None = Field(
        None,
        ge=0,
        description="Price of one GPU-hour, in any currency unit: the job record, the dataset "
        "card, inspect and verify then give the run's cost and cost per 1,000 images; unset = "
        "no cost figures (GPU-hours are recorded either way).",
    )

    @property
    def resolved_encode_threads(self) -> int:
        """Encoding threads per actor: as many as the CPUs it reserves, unless set."""
        return self.encode_threads or max(1, int(self.num_cpus_per_actor))

    @property
    def actor_range(self) -> tuple[int, int]:
        if isinstance(self.actors, int):
            if self.actors < 1:
                raise ValueError("compute.actors must be at least 1")
            return self.actors, self.actors
        return self.actors.min, self.actors.max

    @field_validator("actors")
    @classmethod
    def _positive(cls, value: int | ActorRange) -> int | ActorRange:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"must be at least 1 (got {value})")
        return value

    @field_validator("num_gpus_per_actor")
    @classmethod
    def _non_negative(cls, value: float | str) -> float | str:
        if isinstance(value, float | int) and value < 0:
            raise ValueError(f"must be >= 0 (got {value})")
        return value


DEFAULT_QUALITY = 95
# The image formats whose bytes output.quality changes; PNG is lossless.
LOSSY_FORMATS = frozenset({"jpeg", "webp"})


class OutputSpec(_Section):
    """Where and how the dataset is written."""

    uri: str = Field(description="Output prefix, local path or fsspec URL.")
    format: Literal["webdataset", "parquet", "files"] = Field(
        "webdataset",
        description="How the images are stored (`layout.py`): webdataset = one tar per shard "
        "({key}.{ext} + {key}.json); parquet = one Parquet file per shard, the image bytes in "
        "an `image` column (a Hugging Face datasets Image) beside every manifest column; "
        "files = one image file per image in a folder per shard, with its metadata.parquet.",
    )
    image_format: Literal["png", "jpeg", "webp"] = Field("png", description="Image encoding.")
    quality: int = Field(
        DEFAULT_QUALITY, ge=1, le=100, description="JPEG/WebP quality (PNG is lossless)."
    )
    rows_per_shard: int = Field(1000, ge=1, le=1_000_000, description="Images per shard.")
    storage_options: dict[str, StorageOptionValue] = Field(
        default_factory=dict,
        description="fsspec options for the output filesystem. Credentials are kept as secrets.",
    )
    overwrite: bool = Field(
        False,
        description="Delete koala-batch's own files under the output prefix before starting, "
        "instead of resuming. Never deletes files koala-batch did not write.",
    )
    accumulate: bool = Field(
        False,
        description="Keep the images earlier runs committed for rows that are no longer in "
        "the input, and add the input's: one growing output over a sliding window of inputs "
        "(a nightly run over the newest date partitions). The job record counts the kept "
        "images apart and `verify --spec` accepts them. Off: a run whose input lost rows "
        "that are committed is refused, as the output would no longer match its input.",
    )
    heartbeat_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="Seconds between a running job's heartbeats on the output's lease "
        "(OUTPUT/_lease/). A second run on the same output watches a lease for 2.5 heartbeats: "
        "if it moves, that run is alive and the second exits (exit 1) without writing; if "
        "not, its run died and the second takes the output over.",
    )
    max_failed_fraction: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Fail the job when more than this fraction of its images are error rows.",
    )
    license: str = Field(
        "other",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9.+-]*$",
        description="License of the dataset, as a Hugging Face/SPDX license id (e.g. "
        "'cc-by-4.0', 'apache-2.0'): written to the dataset card (OUTPUT/README.md). "
        "'other' until you choose one; the model's own license may restrict the images.",
    )

    @field_validator("storage_options", mode="after")
    @classmethod
    def _hide_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _secret_storage_options(value)

    @field_validator("image_format", mode="before")
    @classmethod
    def _jpg_alias(cls, value: Any) -> Any:
        return "jpeg" if value == "jpg" else value


class JobSpec(_Section):
    """A whole koala-batch job."""

    input: InputSpec = Field(description="The prompt table.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The pipeline.")
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec, description="Sampler settings."
    )
    compute: ComputeSpec = Field(default_factory=ComputeSpec, description="Ray sizing.")
    output: OutputSpec = Field(description="The dataset written.")

    @model_validator(mode="after")
    def _compile_without_deep_cache(self) -> JobSpec:
        # DeepCache switches the U-Net's path by a step counter in Python, which
        # torch.compile would trace and recompile per step: untested, so refused.
        if self.compute.compile and self.generation.deep_cache_interval is not None:
            raise ValueError(
                "compute.compile and generation.deep_cache_interval cannot be combined "
                "yet: choose one"
            )
        return self

    def snapshot(self) -> dict[str, Any]:
        """JSON-safe spec with every secret masked (for logs and the job record)."""
        return json.loads(self.model_dump_json())

    def fingerprint_fields(self) -> dict[str, Any]:
        """What decides the image bytes: model, dtype, sampler, seed policy, encoding."""
        preset = self.model.settings
        return {
            "model": self.model.name,
            "revision": self.model.revision,
            "variant": self.model.variant,
            "dtype": self.model.dtype,
            "scheduler_timestep_spacing": preset.scheduler_timestep_spacing,
            "steps": self.resolved_steps,
            "guidance_scale": self.resolved_guidance_scale,
            "width": self.generation.width,
            "height": self.generation.height,
            "negative_prompt": self.generation.negative_prompt,
            "images_per_prompt": self.generation.images_per_prompt,
            "seed": self.generation.seed,
            "seed_column": self.input.seed_column,
            "prompt_column": self.input.prompt_column,
            "negative_prompt_column": self.input.negative_prompt_column,
            "id_column": self.input.id_column,
            # Not the pixels, but the manifest schema: one output keeps one schema.
            "passthrough_columns": list(self.input.passthrough_columns),
            "image_format": self.output.image_format,
            # Quality changes no byte of a PNG: only lossy formats record it.
            **(
                {"quality": self.output.quality}
                if self.output.image_format in LOSSY_FORMATS
                else {}
            ),
            "guidance_cutoff": self.generation.guidance_cutoff,
            "deep_cache_interval": self.generation.deep_cache_interval,
            # The columns a job reads its per-row parameters from: only those it has.
            **{
                name: column
                for name, column in self.input.parameter_columns.items()
                if column is not None
            },
            # Not the pixels, but where they are: one output keeps one format.
            "format": self.output.format,
        }

    def spec_constants(self) -> dict[str, Any]:
        """The manifest columns whose value this spec fixes for every row (steps, guidance
        and size are per row: `row_defaults`)."""
        return {
            Col.MODEL: self.model.name,
            Col.IMAGE_FORMAT: self.output.image_format,
        }

    def row_defaults(self) -> dict[str, Any]:
        """The generation parameters of a row whose input names no value for them."""
        return {
            Col.STEPS: self.resolved_steps,
            Col.GUIDANCE_SCALE: self.resolved_guidance_scale,
            Col.WIDTH: self.generation.width,
            Col.HEIGHT: self.generation.height,
        }

    def fingerprint(self) -> str:
        """sha256 of `fingerprint_fields`: equal fingerprints give equal images."""
        blob = json.dumps(self.fingerprint_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def resolved_steps(self) -> int:
        """generation.steps, or the model preset's."""
        return self.generation.steps or self.model.settings.steps

    @property
    def resolved_guidance_scale(self) -> float:
        """generation.guidance_scale, or the model preset's."""
        if self.generation.guidance_scale is not None:
            return self.generation.guidance_scale
        return self.model.settings.guidance_scale


# ---------------------------------------------------------------------------------------
# Loading and overrides


def _members(annotation: Any) -> list[Any]:
    """The types a field annotation admits, unions and `Annotated` unwrapped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [member for arg in get_args(annotation) for member in _members(arg)]
    return [annotation]


def _field_annotation(path: list[str]) -> Any | None:
    """The annotation of the spec field at a dotted path; None where no field is."""
    annotation: Any = JobSpec
    for part in path:
        members = _members(annotation)
        model = next((m for m in members if isinstance(m, type) and issubclass(m, BaseModel)), None)
        mapping = next((m for m in members if get_origin(m) is dict), None)
        if model is not None and part in model.model_fields:
            annotation = model.model_fields[part].annotation
        elif mapping is not None:
            annotation = get_args(mapping)[1] if get_args(mapping) else Any
        else:
            return None
    return annotation


def _is_text(member: Any) -> bool:
    return member is str or (
        get_origin(member) is Literal and all(isinstance(v, str) for v in get_args(member))
    )


# What each parsed YAML scalar may become; an int is a valid float too.
_SCALAR_TYPES: dict[type, tuple[Any, ...]] = {
    bool: (bool,),
    int: (int, float),
    float: (float,),
    type(None): (type(None),),
}


def _comment_in(raw: str) -> bool:
    """Whether YAML would drop part of `raw` as a comment (anything after its last token)."""
    # Block and stream ends sit at the end of the text, past any comment.
    ends = (yaml.StreamEndToken, yaml.BlockEndToken)
    tokens = [t for t in yaml.scan(raw) if not isinstance(t, ends)]
    end = tokens[-1].end_mark.index if tokens else 0
    return bool(raw[end:].strip())


def _parse_yaml(dotted: str, raw: str) -> Any:
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
        commented = _comment_in(raw)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise SpecError(f"--set {dotted}: value {raw!r} is not valid YAML ({detail})") from None
    if commented:
        # A `#` after a space starts a YAML comment: refuse rather than drop half a value.
        raise SpecError(
            f"--set {dotted}: value {raw!r} holds a YAML comment (a '#' after a space) that "
            "would be dropped; remove it, or quote the part of a list that holds the '#'"
        )
    return value


def _override_value(path: list[str], raw: str) -> Any:
    """A `--set` value for the field at `path`.

    Text fields take the text as given: YAML would cut `/data/run #1` at the `#`, read
    `0123` as the octal 83 and `yes` as a bool. Typed fields are parsed as YAML; a field that
    takes text or another type (`input.uri`, a storage option) is text unless YAML reads
    it as a value of one of its other types (a list, a bool, a number, null).
    """
    dotted = ".".join(path)
    if "storage_options" in path[:-1] and path[-1].lower() in SECRET_OPTION_NAMES:
        return raw  # a credential is text, however it looks
    annotation = _field_annotation(path)
    if annotation is None:
        return _parse_yaml(dotted, raw)  # no such field: pydantic names it as unknown
    members = _members(annotation)
    others = [m for m in members if m is not type(None) and not _is_text(m)]
    optional = type(None) in members or Any in members
    if not others and any(_is_text(m) for m in members):
        # `null` (or `~`) unsets an optional text field, as in the file.
        return None if optional and raw in ("null", "~") else raw
    if not any(_is_text(m) or m is Any for m in members) or raw.lstrip()[:1] in ("[", "{"):
        return _parse_yaml(dotted, raw)  # a flow list or mapping is meant as YAML
    try:
        value = _parse_yaml(dotted, raw)
    except SpecError:
        return raw
    if isinstance(value, (list, dict)):
        return value  # what the other types are for
    admitted = _SCALAR_TYPES.get(type(value), ())  # a YAML date, say, stays text
    return value if admitted and any(m in admitted or m is Any for m in members) else raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` to (["a", "b"], value): the text as given for a text field, else YAML."""
    if "=" not in text:
        raise SpecError(f"--set {text!r}: expected KEY=VALUE, e.g. compute.batch_size=8")
    dotted, _, raw = text.partition("=")
    path = [part for part in dotted.strip().split(".")]
    if not all(path):
        raise SpecError(f"--set {text!r}: malformed key {dotted!r}")
    return path, _override_value(path, raw)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of the raw spec dict with each `a.b=value` override set."""
    if not isinstance(raw, dict):
        raise SpecError(_not_a_mapping("<dict>", raw))
    merged = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise SpecError(f"--set {'.'.join(path)}: {where} is not a section")
            node = child
        node[path[-1]] = value
    return merged


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid job spec {source}:"]
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "missing":
            message = "required field is missing"
        got = error.get("input")
        detail = ""
        if error["type"] not in ("missing", "extra_forbidden", "value_error") and not isinstance(
            got, dict
        ):
            # Never echo what was given for a storage option: it may be a credential.
            detail = "" if "storage_options" in where else f" (got {got!r})"
        lines.append(f"  {where}: {message}{detail}")
    return "\n".join(lines)


def _not_a_mapping(source: str, raw: Any) -> str:
    kinds: dict[type, str] = {list: "a list", str: "a single string"}
    kind = kinds.get(type(raw), f"a {type(raw).__name__}")
    return (
        f"invalid job spec {source}: its top level is {kind}, not a mapping of sections; a "
        "spec looks like `input: {uri: prompts.parquet}` and `output: {uri: out/}` on two "
        "lines, plus optional model, generation and compute sections (see jobs/smoke.yaml)"
    )


def spec_from_dict(raw: dict[str, Any], source: str = "<dict>") -> JobSpec:
    """Validate a raw dict into a JobSpec; SpecError names every bad field."""
    if not isinstance(raw, dict):
        raise SpecError(_not_a_mapping(source, raw))
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(exc, source)) from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Load a YAML job spec and apply `a.b=value` overrides."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise SpecError(f"job spec {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(
            f"job spec {path} cannot be read as a text file ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())}); pass the path of a YAML file"
        ) from None
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise SpecError(f"job spec {path} is not valid YAML: {detail}") from None
    if not isinstance(raw, dict):
        # Checked before the overrides, which would otherwise fail inside a list.
        raise SpecError(_not_a_mapping(str(path), raw))
    return spec_from_dict(apply_overrides(raw, overrides or []), source=str(path))
