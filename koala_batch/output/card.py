"""The dataset card: OUTPUT/README.md, written by a successful run right before `_SUCCESS`.

`build_card` is pure: the job record, the spec and a manifest's schema in, Markdown out,
with YAML front matter as the Hugging Face Hub reads it (license, task, size, tags, the
data files of each format) and a `koala_batch` section holding the model and its
license, the counts, the columns and the last run's GPU-hours and cost (when its record
has them). The body says what made the images and how to load them with `datasets`,
`webdataset`, Ray and duckdb, for the output's format.

koala-batch owns OUTPUT/README.md (`layout.CARD_FILE`): each successful run rewrites it
and an overwrite deletes it, like every file koala-batch writes.
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from koala_batch.output.formats import FORMATS
from koala_batch.output.formats.base import output_url
from koala_batch.output.layout import CARD_FILE, MANIFESTS_DIR, SHARDS_DIR, manifest_path
from koala_batch.output.stats import describe_cost
from koala_batch.schemas import MANIFEST_FIELDS
from koala_batch.spec import JobSpec
from koala_batch.storage import Storage

# The Hub's size buckets (the `size_categories` metadata), by upper bound.
_SIZE_CATEGORIES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
    (100_000_000, "10M<n<100M"),
    (1_000_000_000, "100M<n<1B"),
)


def size_category(images: int) -> str:
    """The Hugging Face `size_categories` bucket of a dataset of `images` rows."""
    for bound, name in _SIZE_CATEGORIES:
        if images < bound:
            return name
    return "n>1B"


def output_format(spec: JobSpec) -> str:
    """The spec's output.format."""
    return spec.output.format


def data_files(output: str) -> str:
    """The glob, relative to the output, of the files a reader of that format opens."""
    return FORMATS[output].data_glob


def model_section(spec: JobSpec) -> dict[str, Any]:
    """The model that made the images: name, where its weights come from, its license."""
    preset = spec.model.settings
    return {
        "name": spec.model.name,
        "id": preset.source or spec.model.name,
        "revision": spec.model.revision,
        "license": preset.license,
    }


def loading_snippets(uri: str, output: str) -> str:
    """Markdown: how to read this output with datasets, webdataset, Ray and duckdb."""
    recipes = FORMATS[output].card_recipes(uri)
    datasets_code, webdataset_text = recipes.datasets, recipes.webdataset
    ray_code, duckdb_table = recipes.ray, recipes.duckdb_table
    return (
        "### 🤗 datasets\n\n"
        "```python\n"
        "from datasets import load_dataset\n\n"
        f"{datasets_code}\n"
        + (
            f'# or through this card\'s `configs`: load_dataset("{uri}", split="train")\n'
            if recipes.hub_configs
            else ""
        )
        + "```\n\n"
        "### webdataset\n\n"
        f"{webdataset_text}\n\n"
        "### Ray Data\n\n"
        "```python\n"
        "import ray\n\n"
        f"{ray_code}\n"
        f'manifest = ray.data.read_parquet("{output_url(uri, MANIFESTS_DIR)}/")  # every row, '
        "failed ones included\n"
        "```\n\n"
        "### duckdb\n\n"
        "```sql\n"
        "SELECT status, count(*) AS images\n"
        f"FROM read_parquet('{duckdb_table}')\n"
        "GROUP BY status;\n"
        "```\n\n"
        "Remote outputs need credentials: `storage_options=` for `datasets`, "
        "`filesystem=` for Ray, the `httpfs` extension and a secret for duckdb.\n"
    )


def build_card(record: dict[str, Any], spec: JobSpec, manifest_schema: pa.Schema) -> str:
    """The dataset card (Markdown with YAML front matter) of a finished job."""
    counts = record["counts"]
    stats = record.get("stats") or {}
    model = model_section(spec)
    fmt = output_format(spec)
    columns = {field.name: str(field.type) for field in manifest_schema}
    cost = record.get("cost")
    compute = describe_cost(cost)
    # The last run's figures (a resumed output's earlier runs are not counted).
    priced = (
        {
            "cost": {
                name: cost.get(name)
                for name in ("gpu_hours", "gpu_hour_cost", "cost", "cost_per_1000_images")
            }
        }
        if compute and isinstance(cost, dict)
        else {}
    )
    front = {
        "license": spec.output.license,
        "pretty_name": f"koala-batch images ({model['name']})",
        "task_categories": ["text-to-image"],
        "size_categories": [size_category(counts["images_committed"])],
        "tags": ["koala-batch", "synthetic", "image", fmt],
        "configs": [
            {"config_name": "default", "data_files": [{"split": "train", "path": data_files(fmt)}]}
        ],
        "koala_batch": {
            "model": model,
            "counts": {
                "images": counts["images_committed"],
                "ok": counts["images_ok"],
                "failed": counts["images_failed"],
                "shards": counts["shards"],
            },
            "output_format": fmt,
            "image_format": spec.output.image_format,
            "fingerprint": record.get("fingerprint"),
            "columns": columns,
            **priced,
        },
    }
    failures = stats.get("failures_by_reason") or {}
    failure_lines = "".join(f"| {reason} | {count} |\n" for reason, count in failures.items())
    column_lines = "".join(f"| `{name}` | `{kind}` |\n" for name, kind in columns.items())
    generation = spec.generation
    versions = record.get("versions") or {}
    made_with = ", ".join(f"{name} {value}" for name, value in versions.items())
    uri = spec.output.uri
    return (
        "---\n"
        + yaml.safe_dump(front, sort_keys=False, allow_unicode=True)
        + "---\n\n"
        + f"# koala-batch images: {model['name']}\n\n"
        + f"{counts['images_committed']} images ({counts['images_ok']} ok, "
        f"{counts['images_failed']} failed) in {counts['shards']} shards, made by "
        f"koala-batch from {counts['input_rows']} prompts with `{model['id']}`.\n\n"
        + "## What made it\n\n"
        f"- model: `{model['id']}`"
        + (f" at `{model['revision']}`" if model["revision"] else "")
        + f" (license: {model['license']}; its terms may restrict the images' use)\n"
        f"- sampler: {spec.resolved_steps} steps, guidance scale {spec.resolved_guidance_scale}, "
        f"{generation.width}x{generation.height} (the spec's; each row's are in its manifest "
        f"row), job seed {generation.seed}, {generation.images_per_prompt} image(s) per prompt\n"
        f"- images: {spec.output.image_format}, stored as {fmt} under `{SHARDS_DIR}/`; every "
        f"row, failed ones included, in `{MANIFESTS_DIR}/*.parquet`\n"
        f"- run: {record.get('started_at')} to {record.get('finished_at')}, "
        f"{stats.get('gpu_s_per_image')} GPU-seconds per image\n"
        + (f"- compute: {compute}\n" if compute else "")
        + f"- software: {made_with}\n"
        "- the job record, with the whole spec: `_SUCCESS` (JSON)\n\n"
        + "## Failures by reason\n\n"
        + ("| reason | images |\n|---|---|\n" + failure_lines if failures else "None.\n")
        + "\n## Columns (manifest)\n\n| column | type |\n|---|---|\n"
        + column_lines
        + "\n## Loading\n\n"
        + loading_snippets(uri, fmt)
        + f"\nLicense of this dataset: {spec.output.license} (the spec's `output.license`).\n"
    )


def write_card(storage: Storage, record: dict[str, Any], spec: JobSpec) -> None:
    """Write the dataset card of a finished job to OUTPUT/README.md; the manifest schema
    is the first committed shard's (the bare manifest schema for an output without one)."""
    shards = record.get("shards") or []
    if shards:
        data = storage.read_bytes(manifest_path(shards[0]["shard"]))
        schema = pq.read_schema(io.BytesIO(data))
    else:
        schema = pa.schema(MANIFEST_FIELDS)
    storage.write_bytes(CARD_FILE, build_card(record, spec, schema).encode("utf-8"))
