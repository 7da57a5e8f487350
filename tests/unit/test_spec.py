"""The job spec: strict YAML loading, `--set` overrides, secrets, presets, fingerprint."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr, ValidationError

from koala_batch.spec import (
    JobSpec,
    ModelSpec,
    SpecError,
    apply_overrides,
    load_spec,
    parse_override,
    reveal_storage_options,
    spec_from_dict,
)
from tests.conftest import tiny_spec

BASE_YAML = """\
input:
  uri: prompts.parquet
  prompt_column: prompt
model:
  name: tiny
generation:
  width: 64
  height: 64
  steps: 2
  guidance_scale: 5.0
  seed: 7
compute:
  actors: 1
  batch_size: 4
output:
  uri: out/
  rows_per_shard: 8
"""


def write_yaml(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def base_raw() -> dict:
    return yaml.safe_load(BASE_YAML)


def spec_error(raw: dict) -> str:
    with pytest.raises(SpecError) as info:
        spec_from_dict(raw)
    return str(info.value)


# ---------------------------------------------------------------------------------------
# Loading


def test_load_spec_parses_every_section(tmp_path):
    spec = load_spec(write_yaml(tmp_path, BASE_YAML))

    assert isinstance(spec, JobSpec)
    assert spec.input.uris == ["prompts.parquet"]
    assert spec.model.name == "tiny"
    assert (spec.generation.width, spec.generation.height) == (64, 64)
    assert spec.generation.steps == 2
    assert spec.generation.guidance_scale == 5.0
    assert spec.generation.seed == 7
    assert spec.compute.batch_size == 4
    assert spec.compute.actor_range == (1, 1)
    assert spec.output.uri == "out/"
    assert spec.output.rows_per_shard == 8
    # Defaults of fields the file leaves out.
    assert spec.output.image_format == "png"
    assert spec.generation.images_per_prompt == 1
    assert spec.model.dtype == "auto"


def test_load_spec_accepts_a_list_of_inputs_and_an_actor_range(tmp_path):
    text = BASE_YAML.replace("uri: prompts.parquet", "uri: [a.parquet, b/]").replace(
        "actors: 1", "actors: {min: 1, max: 3}"
    )
    spec = load_spec(write_yaml(tmp_path, text))

    assert spec.input.uris == ["a.parquet", "b/"]
    assert spec.compute.actor_range == (1, 3)


def test_jpg_is_an_alias_of_jpeg(tmp_path):
    spec = load_spec(write_yaml(tmp_path, BASE_YAML + "  image_format: jpg\n"))
    assert spec.output.image_format == "jpeg"


def test_missing_spec_file_is_a_spec_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match="does not exist") as info:
        load_spec(missing)
    assert str(missing) in str(info.value)


def test_invalid_yaml_is_a_spec_error(tmp_path):
    path = write_yaml(tmp_path, "input: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = write_yaml(tmp_path, "- just\n- a list\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(path)


@pytest.mark.parametrize("text", ["- just\n- a list\n", "just a string\n", "42\n"])
def test_top_level_that_is_not_a_mapping_is_refused_before_any_override(tmp_path, text):
    # With a --set, the overrides used to walk into the list: AttributeError, exit 1.
    path = write_yaml(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path, ["output.uri=out/"])
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "not a mapping" in message
    assert "input: {uri: " in message and "output: {uri: " in message  # what a spec looks like


def test_apply_overrides_to_something_not_a_mapping_is_a_spec_error():
    with pytest.raises(SpecError, match="not a mapping"):
        apply_overrides(["a", "list"], ["output.uri=out/"])  # type: ignore[arg-type]


def test_spec_that_is_a_directory_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="cannot be read as a text file") as info:
        load_spec(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_spec_that_is_binary_is_a_spec_error(tmp_path):
    path = tmp_path / "prompts.parquet"
    path.write_bytes(b"PAR1\xff\xfe\x00binary")
    with pytest.raises(SpecError, match="cannot be read as a text file"):
        load_spec(path)


def test_invalid_yaml_error_is_one_line(tmp_path):
    path = write_yaml(tmp_path, "input: [unclosed\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "\n" not in str(info.value)


def test_spec_error_names_the_file(tmp_path):
    path = write_yaml(tmp_path, BASE_YAML.replace("steps: 2", "steps: '2'"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)
    assert "generation.steps" in str(info.value)


def test_spec_is_frozen():
    spec = spec_from_dict(base_raw())
    with pytest.raises(ValidationError):
        spec.generation.steps = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------------------
# Strictness: every bad field is a SpecError naming its dotted path


def test_unknown_field_is_refused_and_named():
    raw = base_raw()
    raw["generation"]["stepz"] = 4
    message = spec_error(raw)
    assert "generation.stepz" in message
    assert "unknown field" in message


def test_unknown_top_level_section_is_refused():
    raw = base_raw()
    raw["extras"] = {"a": 1}
    assert "extras" in spec_error(raw)


def test_steps_given_as_a_string_is_refused():
    raw = base_raw()
    raw["generation"]["steps"] = "4"
    message = spec_error(raw)
    assert "generation.steps" in message
    assert "'4'" in message


@pytest.mark.parametrize("field", ["width", "height"])
def test_size_must_be_a_multiple_of_8(field):
    raw = base_raw()
    raw["generation"][field] = 65
    message = spec_error(raw)
    assert f"generation.{field}" in message
    assert "multiple of 8" in message


def test_zero_actors_is_refused():
    raw = base_raw()
    raw["compute"]["actors"] = 0
    message = spec_error(raw)
    assert "compute.actors" in message
    assert "at least 1" in message


def test_actor_range_with_min_above_max_is_refused():
    raw = base_raw()
    raw["compute"]["actors"] = {"min": 3, "max": 1}
    message = spec_error(raw)
    assert "compute.actors" in message
    assert "min (3) is greater than max (1)" in message


def test_missing_output_is_refused():
    raw = base_raw()
    del raw["output"]
    message = spec_error(raw)
    assert "output" in message
    assert "required field is missing" in message


def test_missing_input_uri_is_refused():
    raw = base_raw()
    del raw["input"]["uri"]
    message = spec_error(raw)
    assert "input.uri" in message


def test_every_bad_field_is_reported_at_once():
    raw = base_raw()
    raw["generation"]["steps"] = "4"
    raw["compute"]["batch_size"] = 0
    message = spec_error(raw)
    assert "generation.steps" in message
    assert "compute.batch_size" in message


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("generation", "seed", -1),
        ("generation", "seed", 2**63),
        ("generation", "images_per_prompt", 0),
        ("generation", "guidance_scale", -0.5),
        ("output", "image_format", "gif"),
        ("output", "quality", 0),
        ("output", "max_failed_fraction", 1.5),
        ("model", "dtype", "float64"),
        ("compute", "gpu_hour_cost", -0.01),
    ],
)
def test_out_of_range_values_are_refused(section, field, value):
    raw = base_raw()
    raw.setdefault(section, {})[field] = value
    assert f"{section}.{field}" in spec_error(raw)


def test_gpu_hour_cost_is_optional_and_leaves_the_fingerprint_alone():
    plain = spec_from_dict(base_raw())
    assert plain.compute.gpu_hour_cost is None
    priced = spec_from_dict(apply_overrides(base_raw(), ["compute.gpu_hour_cost=3"]))
    assert priced.compute.gpu_hour_cost == 3.0
    # A new price must not stop an output from resuming: it changes no image.
    assert priced.fingerprint() == plain.fingerprint()


def test_passthrough_column_clashing_with_manifest_column_is_refused():
    raw = base_raw()
    raw["input"]["passthrough_columns"] = ["category", "seed"]
    message = spec_error(raw)
    assert "passthrough_columns" in message
    assert "seed" in message


def test_empty_input_list_is_refused():
    raw = base_raw()
    raw["input"]["uri"] = []
    assert "input.uri" in spec_error(raw)


# ---------------------------------------------------------------------------------------
# --set overrides


def test_override_is_parsed_as_yaml_and_type_checked(tmp_path):
    path = write_yaml(tmp_path, BASE_YAML)
    spec = load_spec(path, ["compute.batch_size=8", "model.name=koala-700m"])

    assert spec.compute.batch_size == 8
    assert type(spec.compute.batch_size) is int
    assert spec.model.name == "koala-700m"
    # The file itself is untouched.
    assert load_spec(path).compute.batch_size == 4


def test_override_with_a_bad_value_names_the_field(tmp_path):
    path = write_yaml(tmp_path, BASE_YAML)
    with pytest.raises(SpecError) as info:
        load_spec(path, ["generation.seed=abc"])
    assert "generation.seed" in str(info.value)
    assert "'abc'" in str(info.value)


def test_override_of_an_unknown_field_is_refused(tmp_path):
    path = write_yaml(tmp_path, BASE_YAML)
    with pytest.raises(SpecError, match=r"generation\.stepz"):
        load_spec(path, ["generation.stepz=4"])


def test_override_can_create_a_missing_section(tmp_path):
    text = BASE_YAML.replace("model:\n  name: tiny\n", "")
    spec = load_spec(write_yaml(tmp_path, text), ["model.dtype=float32"])
    assert spec.model.dtype == "float32"


def test_override_sets_lists_and_nested_mappings():
    merged = apply_overrides(
        base_raw(),
        [
            "input.passthrough_columns=[category, source_url]",
            "compute.actors={min: 1, max: 4}",
        ],
    )
    spec = spec_from_dict(merged)
    assert spec.input.passthrough_columns == ["category", "source_url"]
    assert spec.compute.actor_range == (1, 4)


def test_override_into_a_value_that_is_not_a_section_is_refused():
    with pytest.raises(SpecError) as info:
        apply_overrides(base_raw(), ["generation.steps.x=1"])
    assert "generation.steps" in str(info.value)
    assert "not a section" in str(info.value)


def test_override_into_a_string_field_is_refused():
    with pytest.raises(SpecError, match=r"input\.uri is not a section"):
        apply_overrides(base_raw(), ["input.uri.bucket=x"])


def test_apply_overrides_does_not_mutate_its_input():
    raw = base_raw()
    merged = apply_overrides(raw, ["generation.seed=99"])
    assert merged["generation"]["seed"] == 99
    assert raw["generation"]["seed"] == 7


@pytest.mark.parametrize("text", ["compute.batch_size", "compute..batch_size=8", ".x=1"])
def test_malformed_override_is_refused(text):
    with pytest.raises(SpecError, match="--set"):
        apply_overrides(base_raw(), [text])


def test_parse_override_splits_the_key_and_parses_the_value():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")
    assert parse_override("a.b=") == (["a", "b"], "")
    assert parse_override("a=null") == (["a"], None)


@pytest.mark.parametrize(
    ("override", "field", "expected"),
    [
        # YAML would cut the text at " #", or read it as a number or a bool.
        ("output.uri=/data/run #1", ("output", "uri"), "/data/run #1"),
        ("output.uri=1e3", ("output", "uri"), "1e3"),
        ("model.name=koala-700m #fast", ("model", "name"), "koala-700m #fast"),
        ("model.revision=1234567", ("model", "revision"), "1234567"),
        ("model.revision=yes", ("model", "revision"), "yes"),
        (
            "generation.negative_prompt=blurry, text #2",
            ("generation", "negative_prompt"),
            "blurry, text #2",
        ),
        ("input.prompt_column= caption", ("input", "prompt_column"), " caption"),
        ("input.uri=/data/p #1.parquet", ("input", "uri"), "/data/p #1.parquet"),
        ("input.uri=2024", ("input", "uri"), "2024"),
        ("input.uri=2024-01-01", ("input", "uri"), "2024-01-01"),  # YAML: a date
        ("compute.ray_address=ray://head:10001", ("compute", "ray_address"), "ray://head:10001"),
    ],
)
def test_override_of_a_text_field_takes_the_text_as_given(override, field, expected):
    spec = spec_from_dict(apply_overrides(base_raw(), [override]))
    section, name = field
    assert getattr(getattr(spec, section), name) == expected


def test_override_of_an_optional_text_field_with_null_unsets_it():
    raw = base_raw()
    raw["model"]["revision"] = "main"
    spec = spec_from_dict(apply_overrides(raw, ["model.revision=null"]))
    assert spec.model.revision is None
    spec = spec_from_dict(apply_overrides(raw, ["generation.negative_prompt=~"]))
    assert spec.generation.negative_prompt is None


def test_override_of_a_typed_field_is_parsed():
    spec = spec_from_dict(
        apply_overrides(
            base_raw(),
            [
                "compute.batch_size=8",
                "compute.channels_last=false",
                "compute.fuse_qkv=null",
                "output.overwrite=true",
                "generation.guidance_cutoff=0.5",
                "compute.num_gpus_per_actor=0.5",
                "compute.actors={min: 2, max: 3}",
                "input.uri=[a.parquet, 'b #1.parquet']",
            ],
        )
    )
    assert spec.compute.batch_size == 8
    assert spec.compute.channels_last is False and spec.compute.fuse_qkv is None
    assert spec.output.overwrite is True
    assert spec.generation.guidance_cutoff == 0.5
    assert spec.compute.num_gpus_per_actor == 0.5
    assert spec.compute.actor_range == (2, 3)
    assert spec.input.uris == ["a.parquet", "b #1.parquet"]
    auto = spec_from_dict(apply_overrides(base_raw(), ["compute.num_gpus_per_actor=auto"]))
    assert auto.compute.num_gpus_per_actor == "auto"


@pytest.mark.parametrize(
    "override",
    [
        "compute.batch_size=8 #was 4",
        "output.overwrite=true # careful",
        "generation.seed=#7",
        "input.uri=[a.parquet] #two",
    ],
)
def test_override_of_a_typed_field_with_a_comment_is_refused(override):
    dotted = override.partition("=")[0]
    with pytest.raises(SpecError) as info:
        apply_overrides(base_raw(), [override])
    assert f"--set {dotted}:" in str(info.value) and "comment" in str(info.value)


def test_override_of_storage_options_keeps_credentials_and_text_as_given():
    spec = spec_from_dict(
        apply_overrides(
            base_raw(),
            [
                "output.storage_options.secret=0123 #abc",  # YAML: the int 123, cut at '#'
                "output.storage_options.key=012345",  # YAML 1.1: an octal int
                "output.storage_options.endpoint_url=http://127.0.0.1:9000/#x",
                "output.storage_options.anon=false",
                "output.storage_options.max_concurrency=4",
                "input.storage_options.client_kwargs.region_name=eu #1",
                "input.storage_options.client_kwargs.aws_session_token=0x1F",
            ],
        )
    )
    output = reveal_storage_options(spec.output.storage_options)
    assert output == {
        "secret": "0123 #abc",
        "key": "012345",
        "endpoint_url": "http://127.0.0.1:9000/#x",
        "anon": False,
        "max_concurrency": 4,
    }
    client = reveal_storage_options(spec.input.storage_options)["client_kwargs"]
    assert client == {"region_name": "eu #1", "aws_session_token": "0x1F"}


# ---------------------------------------------------------------------------------------
# Secrets

SECRET_YAML = BASE_YAML.replace(
    "  prompt_column: prompt\n",
    "  prompt_column: prompt\n"
    "  storage_options:\n"
    "    key: AKIA-INPUT-KEY\n"
    "    secret: input-secret-value\n"
    "    endpoint_url: http://127.0.0.1:9000\n"
    "    client_kwargs: {aws_session_token: nested-session-token}\n",
).replace(
    "  rows_per_shard: 8\n",
    "  rows_per_shard: 8\n"
    "  storage_options: {key: AKIA-OUTPUT-KEY, secret: output-secret-value, anon: false}\n",
)
SECRET_VALUES = [
    "AKIA-INPUT-KEY",
    "input-secret-value",
    "nested-session-token",
    "AKIA-OUTPUT-KEY",
    "output-secret-value",
]


def test_credentials_become_secret_strings(tmp_path):
    spec = load_spec(write_yaml(tmp_path, SECRET_YAML))

    options = spec.input.storage_options
    assert isinstance(options["key"], SecretStr)
    assert isinstance(options["secret"], SecretStr)
    assert isinstance(options["client_kwargs"]["aws_session_token"], SecretStr)
    assert options["endpoint_url"] == "http://127.0.0.1:9000"  # not a credential: plain
    assert isinstance(spec.output.storage_options["key"], SecretStr)
    assert isinstance(spec.output.storage_options["secret"], SecretStr)
    assert spec.output.storage_options["anon"] is False


def test_snapshot_masks_every_secret(tmp_path):
    spec = load_spec(write_yaml(tmp_path, SECRET_YAML))
    snapshot = spec.snapshot()
    dumped = json.dumps(snapshot)

    for value in SECRET_VALUES:
        assert value not in dumped
        assert value not in repr(spec)
        assert value not in str(spec)
    assert snapshot["input"]["storage_options"]["key"] == "**********"
    assert (
        snapshot["input"]["storage_options"]["client_kwargs"]["aws_session_token"] == "**********"
    )
    assert snapshot["input"]["storage_options"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert snapshot["generation"]["seed"] == 7  # the rest is kept


def test_reveal_storage_options_returns_the_real_values(tmp_path):
    spec = load_spec(write_yaml(tmp_path, SECRET_YAML))

    assert reveal_storage_options(spec.input.storage_options) == {
        "key": "AKIA-INPUT-KEY",
        "secret": "input-secret-value",
        "endpoint_url": "http://127.0.0.1:9000",
        "client_kwargs": {"aws_session_token": "nested-session-token"},
    }
    assert reveal_storage_options(spec.output.storage_options) == {
        "key": "AKIA-OUTPUT-KEY",
        "secret": "output-secret-value",
        "anon": False,
    }


def test_secret_given_by_override_is_hidden_too(tmp_path):
    spec = load_spec(write_yaml(tmp_path, BASE_YAML), ["output.storage_options.secret=from-cli"])
    assert isinstance(spec.output.storage_options["secret"], SecretStr)
    assert "from-cli" not in json.dumps(spec.snapshot())
    assert reveal_storage_options(spec.output.storage_options)["secret"] == "from-cli"


def test_invalid_secret_is_not_echoed_in_the_error():
    raw = base_raw()
    raw["output"]["storage_options"] = {"secret": ["do-not-print-me"]}
    message = spec_error(raw)
    assert "output.storage_options.secret" in message
    assert "do-not-print-me" not in message


@pytest.mark.parametrize("name", ["password", "token", "key"])
def test_invalid_credential_of_any_name_is_not_echoed_in_the_error(name):
    raw = base_raw()
    raw["input"]["storage_options"] = {name: ["hunter2-do-not-print"]}
    message = spec_error(raw)
    assert f"input.storage_options.{name}" in message
    assert "hunter2-do-not-print" not in message


def test_numeric_credential_is_masked_in_the_snapshot(tmp_path):
    text = BASE_YAML + "  storage_options: {password: 987654321}\n"
    spec = load_spec(write_yaml(tmp_path, text))
    assert "987654321" not in json.dumps(spec.snapshot())


# ---------------------------------------------------------------------------------------
# Presets


def with_model(name: str, **generation) -> JobSpec:
    raw = base_raw()
    raw["model"] = {"name": name}
    raw["generation"] = {"width": 64, "height": 64, **generation}
    return spec_from_dict(raw)


def test_lightning_preset_defaults():
    spec = with_model("koala-lightning-700m")
    assert spec.resolved_steps == 10
    assert spec.resolved_guidance_scale == 3.5


def test_koala_700m_preset_defaults():
    from koala_batch.presets import PRESETS

    spec = with_model("koala-700m")
    assert spec.resolved_steps == 25
    assert spec.resolved_guidance_scale == PRESETS["koala-700m"].guidance_scale


def test_tiny_preset_defaults():
    spec = with_model("tiny")
    assert spec.resolved_steps == 4
    assert spec.resolved_guidance_scale == 5.0


def test_explicit_settings_beat_the_preset():
    spec = with_model("koala-lightning-700m", steps=3, guidance_scale=0.0)
    assert spec.resolved_steps == 3
    assert spec.resolved_guidance_scale == 0.0  # zero is a setting, not "unset"


def test_unknown_model_gets_generic_defaults():
    spec = with_model("/models/my-sdxl")
    assert spec.resolved_steps == 25
    assert spec.resolved_guidance_scale == 5.0


# ---------------------------------------------------------------------------------------
# Fingerprint


def fingerprint_with(**sections) -> str:
    return spec_from_dict(tiny_spec("in.parquet", "out", **sections)).fingerprint()


def test_fingerprint_is_stable():
    assert fingerprint_with() == fingerprint_with()
    assert len(fingerprint_with()) == 64


@pytest.mark.parametrize(
    "sections",
    [
        {"generation": {"steps": 3}},
        {"generation": {"seed": 8}},
        {"generation": {"guidance_scale": 6.0}},
        {"generation": {"width": 128}},
        {"generation": {"images_per_prompt": 2}},
        {"model": {"name": "koala-700m"}},
        {"model": {"dtype": "bfloat16"}},
        {"input": {"id_column": "id"}},
        {"output": {"image_format": "jpeg"}},
    ],
    ids=lambda s: ".".join([*s, *next(iter(s.values()))]),
)
def test_fingerprint_changes_with_what_decides_the_images(sections):
    assert fingerprint_with(**sections) != fingerprint_with()


@pytest.mark.parametrize(
    "sections",
    [
        {"compute": {"batch_size": 16}},
        {"compute": {"actors": {"min": 1, "max": 4}}},
        {"compute": {"encode_threads": 8}},
        {"output": {"uri": "elsewhere/"}},
        {"output": {"rows_per_shard": 100}},
        {"input": {"uri": "other.parquet"}},
    ],
    ids=lambda s: ".".join([*s, *next(iter(s.values()))]),
)
def test_fingerprint_ignores_what_does_not_decide_the_images(sections):
    assert fingerprint_with(**sections) == fingerprint_with()


def test_quality_enters_the_fingerprint_of_lossy_formats_only():
    png = spec_from_dict(tiny_spec("in.parquet", "out", output={"quality": 50}))
    assert png.fingerprint() == fingerprint_with()
    assert "quality" not in png.fingerprint_fields()
    for image_format in ("jpeg", "webp"):
        assert fingerprint_with(output={"image_format": image_format, "quality": 50}) != (
            fingerprint_with(output={"image_format": image_format})
        )


def test_a_file_url_model_name_is_the_path_it_names():
    # What fetch-model prints for a local copy.
    assert ModelSpec(name="file:///models/tiny-copy").name == "/models/tiny-copy"
    assert ModelSpec(name="s3://bucket/models/tiny").name == "s3://bucket/models/tiny"
    assert ModelSpec(name="etri-vilab/koala-700m").name == "etri-vilab/koala-700m"


def test_fingerprint_sees_a_preset_default_change():
    # Same spec text, different preset: the resolved steps differ, so must the fingerprint.
    lightning = with_model("koala-lightning-700m").fingerprint_fields()
    koala = with_model("koala-700m").fingerprint_fields()
    assert lightning["steps"] == 10 and koala["steps"] == 25
    assert lightning["scheduler_timestep_spacing"] == "trailing"


# ---------------------------------------------------------------------------------------
# Speed and acceleration settings


def test_speed_settings_default_off_or_automatic():
    spec = spec_from_dict(base_raw())

    assert spec.compute.compile is False
    assert spec.compute.channels_last is None and spec.compute.fuse_qkv is None
    assert spec.generation.guidance_cutoff is None
    assert spec.generation.deep_cache_interval is None


def test_accelerations_that_change_pixels_change_the_fingerprint():
    plain = spec_from_dict(base_raw())
    raw = base_raw()
    raw.setdefault("generation", {})["guidance_cutoff"] = 0.5
    cut = spec_from_dict(raw)
    raw["compute"] = {**raw.get("compute", {}), "compile": True}
    compiled = spec_from_dict(raw)

    assert plain.fingerprint_fields()["guidance_cutoff"] is None
    assert cut.fingerprint() != plain.fingerprint()
    # Compiling changes how, not what: resuming with or without it is the same job.
    assert compiled.fingerprint() == cut.fingerprint()


@pytest.mark.parametrize(
    ("section", "field", "value", "expected"),
    [
        ("generation", "guidance_cutoff", 0.0, "greater than 0"),
        ("generation", "guidance_cutoff", 1.5, "less than or equal to 1"),
        ("generation", "deep_cache_interval", 1, "greater than or equal to 2"),
        ("compute", "compile_mode", "max-autotune", "compile_mode"),
    ],
)
def test_bad_speed_settings_are_refused_naming_the_field(section, field, value, expected):
    raw = base_raw()
    raw.setdefault(section, {})[field] = value

    message = spec_error(raw)

    assert field in message and expected in message


def test_compile_and_deep_cache_together_are_refused():
    raw = base_raw()
    raw.setdefault("generation", {})["deep_cache_interval"] = 3
    raw.setdefault("compute", {})["compile"] = True

    assert "cannot be combined" in spec_error(raw)


@pytest.mark.parametrize(
    ("compute", "threads"),
    [
        ({}, 1),
        ({"num_cpus_per_actor": 0.5}, 1),
        ({"num_cpus_per_actor": 6.5}, 6),
        ({"num_cpus_per_actor": 2, "encode_threads": 5}, 5),
    ],
)
def test_encode_threads_follow_the_actors_cpus_unless_set(compute, threads):
    spec = spec_from_dict(tiny_spec("in.parquet", "out", compute=compute))
    assert spec.compute.resolved_encode_threads == threads
