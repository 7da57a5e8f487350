"""Shared helpers for the benchmarks: environment record, results, tables, models, prompts."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import re
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
SAMPLE_PROMPTS = REPO_ROOT / "jobs" / "data" / "parti-sample.parquet"

# The negative prompt of the KOALA model cards' snippet.
CARD_NEGATIVE_PROMPT = "worst quality, low quality, illustration, low resolution"

# "tiny" and "cpu" are CPU-sized; the others are the real architectures with random
# weights, several GB in float32: built only when asked for.
SMALL_ARCHITECTURES = ("tiny", "cpu")
REAL_ARCHITECTURES = (
    "koala-700m",
    "koala-1b",
    "koala-lightning-700m",
    "koala-lightning-1b",
    "sdxl",
)
ARCHITECTURES = SMALL_ARCHITECTURES + REAL_ARCHITECTURES
# Bump when a bench model's architecture or seed changes, so stale caches are not reused.
BENCH_MODEL_VERSION = 1

QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

VERSIONED_PACKAGES = (
    "koala-batch",
    "torch",
    "diffusers",
    "transformers",
    "ray",
    "pyarrow",
    "numpy",
    "pillow",
    "s3fs",
    "moto",
)


# ---------------------------------------------------------------------------------------
# Environment and results


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() is often empty)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name() -> str:
    """The CUDA device name, else the CPU model and its core count."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_model()} x{os.cpu_count()} cores"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def git_state() -> dict[str, Any]:
    """HEAD and whether the tree differs from it (bench/results/ does not count)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout

    try:
        revision = git("rev-parse", "HEAD").strip()
        changed = [
            line[3:]
            for line in git("status", "--porcelain", "--", ".", ":!bench/results").splitlines()
        ]
    except (OSError, subprocess.CalledProcessError):
        return {"revision": None, "dirty": None, "changed_files": []}
    return {"revision": revision, "dirty": bool(changed), "changed_files": changed[:50]}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def environment() -> dict[str, Any]:
    """What the numbers depend on besides the settings: device, versions, revision."""
    import torch

    return {
        "device": device_name(),
        "cuda": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        # Other work on the machine skews every number: recorded at the end of the run.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": package_versions(),
        "git": git_state(),
    }


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def write_result(name: str, settings: dict[str, Any], results: Any) -> Path:
    """Write bench/results/{name}-{device}-{UTC time}.json; return its path."""
    env = environment()
    now = datetime.now(UTC)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{slug(env['device'])}-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    document = {
        "benchmark": name,
        "written_at": now.isoformat(),
        "environment": env,
        "settings": settings,
        "results": results,
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 0.001 <= abs(value) < 10_000:
            return f"{value:.4g}" if abs(value) < 100 else f"{value:.1f}"
        return f"{value:.3e}"
    return "" if value is None else str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str = "") -> None:
    """A plain-text table of the given columns, one line per row."""
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def rate(images: int, seconds: float) -> dict[str, float | None]:
    """s/image and images/s of a timed run."""
    return {
        "s_per_image": seconds / images if images else None,
        "images_per_s": images / seconds if seconds > 0 else None,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


# ---------------------------------------------------------------------------------------
# Models


def build_cpu_pipeline(seed: int = 0):
    """The tiny SDXL pipeline with a wider U-Net, block_out_channels (64, 128).

    About 0.25 s/image at 256x256, 4 steps, one core: big enough that the U-Net
    dominates like on a GPU, small enough for CPU runs.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from koala_batch.models.tiny import build_tiny_pipeline

    tiny = build_tiny_pipeline(seed)
    config = {**tiny.unet.config, "block_out_channels": [64, 128], "norm_num_groups": 32}
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config)
    pipeline = StableDiffusionXLPipeline(**{**tiny.components, "unet": unet})
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_pipeline(arch: str):
    """A random-weight pipeline of the named architecture (not tiny), on the fastest device."""
    import torch

    if arch == "cpu":
        return build_cpu_pipeline()
    from bench.architectures import build_random_pipeline

    torch.manual_seed(0)
    # Initialising a billion parameters is much faster on the GPU; safetensors copies
    # them back to the host when saving.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return build_random_pipeline(arch, device=device)


def prepare_model(arch: str, cache_dir: Path | None = None) -> Path:
    """A saved diffusers directory (safetensors) for the architecture, built once and reused."""
    from koala_batch.models.tiny import default_cache_dir, ensure_tiny_model, save_pipeline_once

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    if arch == "tiny":
        return ensure_tiny_model(cache_dir)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache_dir / f"bench-{arch}-v{BENCH_MODEL_VERSION}"
    if (target / "model_index.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"building the {arch} model with random weights in {target} (once)", flush=True)
    return save_pipeline_once(lambda: build_pipeline(arch), target)


def warm_page_cache(directory: Path) -> float:
    """Read every file of a model once, so the first of several loads is not the only
    one to pay for the disk; returns the seconds it took."""
    started = time.perf_counter()
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                while handle.read(1 << 24):
                    pass
    return time.perf_counter() - started


@dataclass(frozen=True)
class Sampler:
    """The sampler settings every variant of a benchmark shares."""

    steps: int
    guidance_scale: float
    width: int
    height: int
    negative_prompt: str | None


def resolve_sampler(
    arch: str, size: int, steps: int | None, guidance: float | None, negative: str | None
) -> Sampler:
    """Explicit settings, else the architecture's recommended ones.

    A local model directory gets koala-batch's generic defaults (25 steps), never the
    preset of the architecture it was built as, so the job spec always passes both.
    """
    from koala_batch.presets import preset_for

    # The CPU-sized models are for speed, not pictures: 4 steps like the tiny preset.
    preset = preset_for("tiny" if arch in SMALL_ARCHITECTURES else arch)
    return Sampler(
        steps=steps or preset.steps,
        guidance_scale=preset.guidance_scale if guidance is None else guidance,
        width=size,
        height=size,
        negative_prompt=negative or None,
    )


def add_model_arguments(parser: argparse.ArgumentParser, *, size: int = 256) -> None:
    parser.add_argument(
        "--arch",
        choices=ARCHITECTURES,
        default="cpu",
        help="model architecture (random weights); real ones are several GB (default: cpu)",
    )
    parser.add_argument("--size", type=int, default=size, help=f"image side (default: {size})")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps (default: the architecture's: 4 tiny/cpu, 10 lightning, 25 others)",
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale (default: the architecture's: 3.5 lightning, 5.0 others)",
    )
    parser.add_argument(
        "--negative",
        default=CARD_NEGATIVE_PROMPT,
        help="negative prompt for every image; '' for none (default: the model cards')",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where built models are kept (default: $KOALA_BATCH_CACHE or ~/.cache/koala-batch)",
    )


def sampler_from_args(args: argparse.Namespace) -> Sampler:
    return resolve_sampler(args.arch, args.size, args.steps, args.guidance, args.negative)


def generation_section(sampler: Sampler, seed: int = 0) -> dict[str, Any]:
    return {
        "steps": sampler.steps,
        "guidance_scale": sampler.guidance_scale,
        "width": sampler.width,
        "height": sampler.height,
        "negative_prompt": sampler.negative_prompt,
        "seed": seed,
    }


def parse_int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,2,4 (got {text!r})")
    return values


# ---------------------------------------------------------------------------------------
# Prompts and work rows


def prompt_table(count: int) -> pa.Table:
    """`count` rows of the PartiPrompts sample, cycled, with unique ids (id, prompt)."""
    sample = pq.read_table(SAMPLE_PROMPTS, columns=["id", "prompt"]).to_pylist()
    rows = [sample[i % len(sample)] for i in range(count)]
    return pa.table(
        {
            "id": [f"{row['id']}~{i // len(sample)}" for i, row in enumerate(rows)],
            "prompt": [row["prompt"] for row in rows],
        }
    )


def work_rows(spec: Any, prompts: pa.Table) -> pa.Table:
    """The validate stage's output for an in-memory prompt table: one row per image."""
    from koala_batch.schemas import Col
    from koala_batch.stages.expand import ExpandImages

    count = prompts.num_rows
    read = pa.table(
        {
            Col.SOURCE: pa.array(["prompts.parquet"] * count, pa.string()),
            Col.ROW_INDEX: pa.array(range(count), pa.int64()),
            Col.ROW_ORDINAL: pa.array(range(count), pa.int64()),
            **{name: prompts.column(name) for name in prompts.column_names},
        }
    )
    return ExpandImages(spec)(read)


def batches(table: pa.Table, batch_size: int) -> list[pa.Table]:
    return [table.slice(i, batch_size) for i in range(0, table.num_rows, batch_size)]


# ---------------------------------------------------------------------------------------
# Storage for whole jobs


@dataclass(frozen=True)
class JobStorage:
    """Where a benchmark job reads its prompts and writes its output."""

    input_uri: str
    output_prefix: str  # each run appends its own name
    storage_options: dict[str, Any]

    def output_uri(self, name: str) -> str:
        return f"{self.output_prefix}/{name}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def job_storage(prompts: pa.Table, *, s3: bool, keep: Path | None = None) -> Iterator[JobStorage]:
    """The prompts as Parquet in a temporary directory, or on moto's S3 server on 127.0.0.1
    (real HTTP and s3fs, as the integration tests use it)."""
    buffer = io.BytesIO()
    pq.write_table(prompts, buffer)
    if not s3:
        with tempfile.TemporaryDirectory(prefix="koala-bench-") as tmp:
            root = Path(keep) if keep else Path(tmp)
            (root / "in").mkdir(parents=True, exist_ok=True)
            (root / "in" / "prompts.parquet").write_bytes(buffer.getvalue())
            yield JobStorage(str(root / "in" / "prompts.parquet"), str(root / "out"), {})
        return

    import s3fs
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        # s3fs needs credentials even for moto; any values do.
        options = {"key": "bench-key", "secret": "bench-secret"}
        options["endpoint_url"] = f"http://127.0.0.1:{port}"
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        bucket = f"bench-{uuid.uuid4().hex[:12]}"
        fs.mkdir(bucket)
        fs.pipe_file(f"{bucket}/in/prompts.parquet", buffer.getvalue())
        yield JobStorage(f"s3://{bucket}/in/prompts.parquet", f"s3://{bucket}/out", options)
    finally:
        server.stop()


def job_spec(
    storage: JobStorage,
    run_name: str,
    model: str,
    sampler: Sampler,
    compute: dict[str, Any],
    output: dict[str, Any] | None = None,
    dtype: str = "auto",
) -> dict[str, Any]:
    """A raw job spec over the benchmark's prompts (id column `id`)."""
    return {
        "input": {
            "uri": storage.input_uri,
            "prompt_column": "prompt",
            "id_column": "id",
            "storage_options": dict(storage.storage_options),
        },
        "model": {"name": model, "dtype": dtype},
        "generation": generation_section(sampler),
        "compute": compute,
        "output": {
            "uri": storage.output_uri(run_name),
            "storage_options": dict(storage.storage_options),
            # A rerun into a kept directory must generate again, not resume.
            "overwrite": True,
            **(output or {}),
        },
    }


def masked_spec(raw: dict[str, Any]) -> dict[str, Any]:
    """The raw spec with storage options masked: moto's credentials are dummies, but a
    results file is no place for credentials of any kind."""
    masked = {section: dict(values) for section, values in raw.items()}
    for section in ("input", "output"):
        if masked.get(section, {}).get("storage_options"):
            masked[section]["storage_options"] = "<masked>"
    return masked


def local_ray_cpus(local_num_cpus: int | None) -> int:
    """The logical CPUs of the local Ray cluster koala_batch.run starts (as job.connect_ray
    sizes it; recorded because it decides how many encode and write tasks run at once)."""
    return local_num_cpus or max(4, 2 * (os.cpu_count() or 1))


def add_compute_arguments(parser: argparse.ArgumentParser, *, actors: int = 2) -> None:
    parser.add_argument(
        "--actors", type=int, default=actors, help=f"generator actors (default: {actors})"
    )
    parser.add_argument(
        "--cpus-per-actor",
        type=float,
        default=1.0,
        help="compute.num_cpus_per_actor (default: 1)",
    )
    parser.add_argument(
        "--local-cpus",
        type=int,
        default=None,
        help="compute.local_num_cpus, logical CPUs of the local Ray cluster "
        "(default: koala-batch's, max(4, 2 x cores))",
    )
    parser.add_argument(
        "--object-store-mb",
        type=int,
        default=None,
        help="compute.local_object_store_mb (default: koala-batch's)",
    )
    parser.add_argument(
        "--rows-per-shard", type=int, default=32, help="output.rows_per_shard (default: 32)"
    )
    parser.add_argument(
        "--s3",
        action="store_true",
        help="input and output on moto's S3 server on 127.0.0.1 instead of a local directory",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="write local input and output under this directory and keep them",
    )


def compute_section(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    compute: dict[str, Any] = {
        "actors": args.actors,
        "batch_size": args.batch,
        "num_cpus_per_actor": args.cpus_per_actor,
        **extra,
    }
    if args.local_cpus:
        compute["local_num_cpus"] = args.local_cpus
    if args.object_store_mb:
        compute["local_object_store_mb"] = args.object_store_mb
    return compute


def as_dict(value: Any) -> dict[str, Any]:
    return asdict(value)


def quiet_libraries() -> None:
    """Keep progress bars and import-time warnings out of the tables; call before imports."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)


def start_run(verbose: bool) -> None:
    """What every benchmark does first: quiet libraries, then logging (info with -v)."""
    quiet_libraries()
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_stage(stage: Any, tables: Sequence[pa.Table], concurrency: int) -> int:
    """Call a generation stage on every table, `concurrency` calls at once as the job's
    actors take them (one holds the pipeline while another encodes); the ok count."""
    from concurrent.futures import ThreadPoolExecutor

    from koala_batch.schemas import STATUS_OK, Col

    def ok_count(table: pa.Table) -> int:
        return stage(table).column(Col.STATUS).to_pylist().count(STATUS_OK)

    if concurrency <= 1:
        return sum(ok_count(table) for table in tables)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return sum(pool.map(ok_count, tables))


def add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the generation stage run in-process: its encoding and concurrency."""
    from koala_batch.stages.generate import CALLS_PER_ACTOR

    parser.add_argument(
        "--format",
        choices=("png", "jpeg", "webp"),
        default="png",
        help="output.image_format: the stage encodes its images (default: png)",
    )
    parser.add_argument(
        "--quality", type=int, default=95, help="output.quality, JPEG/WebP (default: 95)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=CALLS_PER_ACTOR,
        help="concurrent calls of the in-process stage, as a job's actor takes them "
        f"(default: koala-batch's {CALLS_PER_ACTOR})",
    )
