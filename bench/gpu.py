"""GPU benchmark in one command, for a bare CUDA machine with no network.

In this process and without Ray, on random-weight KOALA architectures at 1024x1024:
(a) the KOALA model-card loop (fp16, one image per call) against (b) koala-batch's
generation stage (GenerateImages) for KOALA-700M (25 steps, guidance 5) and
KOALA-Lightning-700M (10 steps, guidance 3.5); a batch-size sweep of (b); (b) with
compute.compile on against off; peak GPU memory; and each row's achieved TFLOP/s against
the FLOP bound and the issue's targets. Measurements stop before `--budget-s` runs out
(those left are recorded as skipped); the JSON is rewritten after every measurement, so a
run stopped early still leaves its results.

    make gpu-wheels                                  # here, once: fills bench/wheels/
    python3 bench/gpu.py --out DIR                   # there, with bench/wheels carried
    .venv/bin/python bench/gpu.py --dry-run --out /tmp/gpu-dry    # here: CPU, tiny model

Where diffusers or pydantic cannot be imported (a GPU machine's image), the wheels of
bench/wheels are installed into a temporary directory first. Ray is never imported.
Writes DIR/gpu-<device>-<UTC time>.json and DIR/summary.md, and prints the summary.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# `python3 bench/gpu.py` puts bench/ first on sys.path, where `import bench` and
# `import koala_batch` fail (koala-batch is not installed on a GPU machine).
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import common, generator  # noqa: E402 - needs the repo root on sys.path

NAME = "gpu"
DEFAULT_WHEELS = REPO_ROOT / "bench" / "wheels"
# Not in a GPU machine's image; everything else the generator path imports is.
NEEDS_WHEELS = ("diffusers", "pydantic")
# Importable from bench/wheels; recorded with where each was loaded from.
WHEEL_MODULES = (
    "diffusers",
    "pydantic",
    "pydantic_core",
    "annotated_types",
    "typing_inspection",
    "typing_extensions",
)
DEFAULT_CASES = ("koala-700m", "koala-lightning-700m")
MEASUREMENTS = ("card", "stage", "breakdown", "compile", "decode")

# FLOP model (the numbers): one U-Net forward on one 128x128 latent (1024x1024
# image), and one VAE decode of a 1024x1024 image, in TFLOP. Text encoders are left out
# (under 1%).
UNET_TFLOP_AT_128 = {
    "koala-700m": 2.70,
    "koala-lightning-700m": 2.70,
    "koala-1b": 3.43,
    "koala-lightning-1b": 3.43,
}
VAE_DECODE_TFLOP_AT_1024 = 10.5
# Dense bf16/fp16 tensor-core peaks, by the first fragment of the device name that
# matches (the PCIe and NVL H100s before the SXM one).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)
# The targets at 1024x1024, by (architecture, steps): seconds per image.
TARGET_S_PER_IMAGE = {("koala-700m", 25): 0.30, ("koala-lightning-700m", 10): 0.12}
# Seconds a cold torch.compile of the U-Net and VAE decoder is assumed to take before
# one has been measured in this run (the budget check needs a figure).
COMPILE_GUESS_S = 150.0
# Before any load is measured: seconds to load a pipeline from the page cache.
LOAD_GUESS_S = 20.0

SUMMARY_COLUMNS = (
    ("case", "case"),
    ("variant", "variant"),
    ("batch", "batch"),
    ("compile", "compile"),
    ("dtype", "dtype"),
    ("images", "images"),
    ("s_per_image", "s/image"),
    ("images_per_s", "images/s"),
    ("ratio_to_a", "b/a"),
    ("ratio_to_eager", "vs eager"),
    ("achieved_tflops", "TFLOP/s"),
    ("fraction_of_peak", "of peak"),
    ("bound_s_per_image", "bound s/image"),
    ("target_s_per_image", "target s/image"),
    ("meets_target", "meets"),
    ("load_s", "load s"),
    ("peak_gpu_gib", "peak GiB"),
    ("errors", "errors"),
)


# ---------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line settings, with the GPU or dry-run defaults filled in."""
    parser = argparse.ArgumentParser(
        prog="python3 bench/gpu.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="on CPU with the CPU-sized model, 64x64, 2 steps, 2 images: proves the script",
    )
    parser.add_argument(
        "--cases",
        type=_name_list,
        default=list(DEFAULT_CASES),
        help="architectures measured, each with its own steps and guidance "
        f"(default: {','.join(DEFAULT_CASES)})",
    )
    parser.add_argument(
        "--arch",
        choices=common.ARCHITECTURES,
        default=None,
        help="build this model for every case instead of the case's own (default: the "
        "case's; cpu with --dry-run)",
    )
    parser.add_argument("--size", type=int, default=None, help="image side (1024; dry run 64)")
    parser.add_argument(
        "--steps", type=int, default=None, help="steps for every case (the case's; dry run 2)"
    )
    parser.add_argument(
        "--images", type=int, default=None, help="images per measurement (16; dry run 2)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="batch size of (b) and of compile (4; dry run 2)"
    )
    parser.add_argument(
        "--sweep",
        type=common.parse_int_list,
        default=None,
        help="batch sizes of (b), --batch among them (1,2,4,8; dry run 1,2)",
    )
    parser.add_argument(
        "--compile-modes",
        type=_name_list,
        default=None,
        help="compute.compile_mode of each compiled (b) run; '' for none (default; dry run: none)",
    )
    parser.add_argument(
        "--measure",
        type=_name_list,
        default=list(MEASUREMENTS),
        help="what to measure, of " + ",".join(MEASUREMENTS) + " (default: all): card = (a), "
        "stage = the (b) sweep, breakdown = (b)'s seconds per part (text encoders, U-Net, "
        "VAE decode, rest) at --batch, compile = (b) compiled at --batch, decode = "
        "koala-batch's decode against the pipeline's VAE decode and image processor",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="model.dtype of (b); auto = bf16 on CUDA (default: auto)",
    )
    parser.add_argument(
        "--channels-last",
        choices=("auto", "on", "off"),
        default="auto",
        help="compute.channels_last of (b); auto = koala-batch's (default: auto)",
    )
    parser.add_argument(
        "--fuse-qkv",
        choices=("auto", "on", "off"),
        default="auto",
        help="compute.fuse_qkv of (b); auto = koala-batch's (default: auto)",
    )
    # Not common.add_stage_arguments: it imports koala_batch.stages.generate, hence pydantic,
    # which on a GPU machine exists only after bootstrap() has installed the wheels.
    parser.add_argument(
        "--format",
        choices=("png", "jpeg", "webp"),
        default="png",
        help="output.image_format: (b) encodes its images (default: png)",
    )
    parser.add_argument("--quality", type=int, default=95, help="output.quality (default: 95)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: all cores; dry run 1, as two threads on two busy "
        "cores can be several times slower than one)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed calls before each timed loop (default: 1)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="start no measurement that would end after this many seconds (default: 420)",
    )
    parser.add_argument(
        "--grace-s",
        type=float,
        default=45.0,
        help="past budget + grace, stop at once with the results so far (default: 45)",
    )
    parser.add_argument(
        "--wheels",
        type=Path,
        default=DEFAULT_WHEELS,
        help="wheels installed where diffusers or pydantic is missing (default: bench/wheels)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where built models are kept (default: $KOALA_BATCH_CACHE or ~/.cache/koala-batch)",
    )
    args = parser.parse_args(argv)
    dry = args.dry_run
    defaults = {
        "arch": "cpu" if dry else None,
        "size": 64 if dry else 1024,
        "steps": 2 if dry else None,
        "images": 2 if dry else 16,
        "batch": 2 if dry else 4,
        "sweep": [1, 2] if dry else [1, 2, 4, 8],
        "compile_modes": [] if dry else ["default"],
        "threads": 1 if dry else os.cpu_count() or 1,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.batch not in args.sweep:
        args.sweep = sorted({*args.sweep, args.batch})
    for name in ("size", "images", "batch", "warmup", "threads"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name}: expected a positive number")
    unknown = [name for name in args.measure if name not in MEASUREMENTS]
    if unknown:
        parser.error(f"--measure: unknown {unknown}; known: {', '.join(MEASUREMENTS)}")
    if "compile" not in args.measure:
        args.compile_modes = []
    unknown = [case for case in args.cases if case not in common.REAL_ARCHITECTURES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; known: {', '.join(common.REAL_ARCHITECTURES)}")
    return args


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def tri_state(value: str) -> bool | None:
    """auto/on/off to a spec's None/True/False."""
    return {"auto": None, "on": True, "off": False}[value]


# ---------------------------------------------------------------------------------------
# Wheels for a machine without diffusers or pydantic


def missing_modules(names: Sequence[str]) -> list[str]:
    """The modules of `names` that cannot be imported here."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def wheel_name_version(path: Path) -> tuple[str, str]:
    """Distribution name (normalized) and version from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def version_key(text: str) -> tuple[int, ...]:
    """The release numbers of a version, for ordering (local parts and suffixes ignored)."""
    release = re.match(r"[\d.]+", text.split("+")[0])
    return tuple(int(part) for part in release.group(0).split(".") if part) if release else ()


def wheels_to_install(wheels: Sequence[Path]) -> list[Path]:
    """The wheels whose distribution is missing here or older than the wheel: the
    machine's own packages (torch's typing-extensions, say) are kept where new enough."""
    chosen = []
    for wheel in wheels:
        name, wanted = wheel_name_version(wheel)
        try:
            have = installed_version(name)
        except PackageNotFoundError:
            chosen.append(wheel)
            continue
        if version_key(have) < version_key(wanted):
            chosen.append(wheel)
    return chosen


def install_wheels(wheels: Sequence[Path], target: Path) -> None:
    """Install wheels into `target` without an index or their dependencies."""
    if importlib.util.find_spec("pip") is None:
        # What pip --target does with wheels that carry no scripts or data.
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                archive.extractall(target)
        return
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    command += ["--no-compile", "--no-cache-dir", "--disable-pip-version-check"]
    subprocess.run([*command, "--target", str(target), *map(str, wheels)], check=True)


def bootstrap(wheels_dir: Path) -> dict[str, Any]:
    """Make diffusers and pydantic importable from `wheels_dir` where they are not: the
    wheels go into a temporary directory put first on sys.path and PYTHONPATH (for
    subprocesses such as torch.compile's workers). Exits with one line if there are none.
    """
    missing = missing_modules(NEEDS_WHEELS)
    if not missing:
        return {"needed": False, "target": None, "installed": [], "kept": []}
    wheels = sorted(Path(wheels_dir).glob("*.whl"))
    if not wheels:
        raise SystemExit(
            f"{' and '.join(missing)} not importable and {wheels_dir} holds no wheels: "
            "run `make gpu-wheels` first (and carry bench/wheels to this machine)"
        )
    target = Path(tempfile.mkdtemp(prefix="koala-gpu-site-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    chosen = wheels_to_install(wheels)
    started = time.perf_counter()
    install_wheels(chosen, target)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(target), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    importlib.invalidate_caches()
    still = missing_modules(NEEDS_WHEELS)
    if still:
        raise SystemExit(
            f"{' and '.join(still)} still not importable after installing {wheels_dir}"
        )
    return {
        "needed": True,
        "missing_before": missing,
        "target": str(target),
        "installed": [wheel.name for wheel in chosen],
        "kept": [wheel.name for wheel in wheels if wheel not in chosen],
        "install_s": time.perf_counter() - started,
    }


def module_origins(names: Sequence[str], target: str | None) -> dict[str, Any]:
    """Each module's version and file, and whether it came from the installed wheels."""
    origins: dict[str, Any] = {}
    for name in names:
        module = importlib.import_module(name)
        location = getattr(module, "__file__", None) or ""
        found: str | None
        try:
            found = installed_version(name)
        except PackageNotFoundError:
            found = getattr(module, "__version__", None)
        origins[name] = {
            "version": found,
            "file": location,
            "from_wheels": bool(target) and location.startswith(target or "\0"),
        }
    return origins


# ---------------------------------------------------------------------------------------
# FLOPs, peaks and targets


def image_tflop(
    arch: str, steps: int, guidance_scale: float, width: int, height: int
) -> float | None:
    """TFLOP to make one image: U-Net forwards (two latents per step with classifier-free
    guidance, as diffusers runs it when guidance > 1) plus one VAE decode; None for an
    architecture without a FLOP model. Exact at 1024x1024; other sizes scale by area,
    which undercounts attention a little above it and overcounts below."""
    unet = UNET_TFLOP_AT_128.get(arch)
    if unet is None:
        return None
    latents_per_step = 2 if guidance_scale > 1.0 else 1
    latent_area = (width // 8) * (height // 8) / 128**2
    return (
        steps * latents_per_step * unet * latent_area
        + VAE_DECODE_TFLOP_AT_1024 * width * height / 1024**2
    )


def peak_tflops(device: str) -> tuple[float | None, str | None]:
    """The dense bf16 peak assumed for a device name, and the name fragment matched."""
    for fragment, peak in PEAK_TFLOPS:
        if fragment.lower() in device.lower():
            return peak, fragment
    return None, None


def target_s_per_image(arch: str, steps: int, width: int, height: int) -> float | None:
    """The issue's target for this architecture and step count at 1024x1024, if any."""
    if (width, height) != (1024, 1024):
        return None
    return TARGET_S_PER_IMAGE.get((arch, steps))


def flop_columns(
    s_per_image: float | None, tflop: float | None, peak: float | None
) -> dict[str, float | None]:
    """Achieved TFLOP/s, its fraction of the peak, and the FLOP-bound seconds per image."""
    achieved = tflop / s_per_image if tflop and s_per_image else None
    return {
        "image_tflop": tflop,
        "achieved_tflops": achieved,
        "fraction_of_peak": achieved / peak if achieved and peak else None,
        "bound_s_per_image": tflop / peak if tflop and peak else None,
    }


# ---------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Case:
    """One architecture measured with its own sampler settings, on the model `arch`."""

    name: str
    arch: str
    steps: int
    guidance_scale: float


@dataclass
class Report:
    """The results so far, rewritten to JSON and summary.md after every measurement."""

    path: Path
    summary_path: Path
    environment: dict[str, Any]
    settings: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    status: str = "running"

    def document(self) -> dict[str, Any]:
        return {
            "benchmark": NAME,
            "written_at": datetime.now(UTC).isoformat(),
            "status": self.status,
            "elapsed_s": time.monotonic() - self.started,
            "environment": self.environment,
            "settings": self.settings,
            "results": {
                "rows": self.rows,
                "skipped": self.skipped,
                "errors": self.errors,
                "timeline": self.timeline,
                **self.extra,
            },
        }

    def save(self) -> None:
        """Write the JSON and the summary, each replaced whole (never half-written)."""
        _write_atomic(self.path, json.dumps(self.document(), indent=2, default=str) + "\n")
        _write_atomic(self.summary_path, self.summary())

    def summary(self) -> str:
        """A markdown table of the rows, then what was skipped or failed."""
        env, settings = self.environment, self.settings
        peak = settings.get("peak_tflops")
        lines = [
            f"# GPU benchmark: {env.get('device')}",
            "",
            f"{settings['width']}x{settings['height']}, {settings['images']} images per row, "
            f"(b) as {settings['image_format']}, {settings['concurrency_b']} calls at once; "
            f"peak assumed {peak if peak else 'unknown'} TFLOP/s"
            + (f" ({settings['peak_matched']})" if settings.get("peak_matched") else "")
            + f"; {self.status} after {time.monotonic() - self.started:.0f} s "
            f"(budget {settings['budget_s']:.0f} s)",
            "",
            "| " + " | ".join(title for _, title in SUMMARY_COLUMNS) + " |",
            "|" + "---|" * len(SUMMARY_COLUMNS),
        ]
        for row in self.rows:
            cells = [_summary_cell(key, row.get(key)) for key, _ in SUMMARY_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "b/a: images/s of the row over (a)'s of the same case; vs eager: over (b) "
            "without compile at the same batch; bound: TFLOP per image / peak.",
        ]
        for name, result in self.extra.get("breakdown", {}).items():
            parts = ", ".join(
                f"{part} {seconds:.3g}" for part, seconds in result["parts_s_per_image"].items()
            )
            lines.append(
                f"- breakdown {name}, batch {result['batch']}: {result['s_per_image']:.3g} "
                f"s/image = {parts}"
            )
        for item in self.skipped:
            lines.append(f"- skipped {item['measurement']}: {item['reason']}")
        for item in self.errors:
            lines.append(f"- failed {item['measurement']}: {item['error']}")
        return "\n".join(lines) + "\n"


def _summary_cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if key == "fraction_of_peak":
        return f"{100 * value:.0f}%"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


# ---------------------------------------------------------------------------------------
# Measurements


@dataclass
class Bench:
    """The run's settings, budget and what has been measured so far."""

    args: argparse.Namespace
    report: Report
    peak: float | None
    deadline: float
    load_s: float | None = None
    compile_s: float | None = None
    s_per_image: dict[str, float] = field(default_factory=dict)
    eager: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def attempt(self, name: str, estimate_s: float | None, action: Callable[[], Any]) -> Any:
        """Run one measurement unless its estimate overruns the budget; a failure is
        recorded and the run goes on. The report is saved either way."""
        remaining = self.remaining()
        if remaining <= 0 or (estimate_s is not None and estimate_s > remaining):
            reason = f"{remaining:.0f} s left of the budget" + (
                f", estimated {estimate_s:.0f} s" if estimate_s is not None else ""
            )
            self.report.skipped.append({"measurement": name, "reason": reason})
            self.report.save()
            print(f"skipped {name}: {reason}", flush=True)
            return None
        print(f"{name} ...", flush=True)
        started = time.monotonic()
        outcome = "ok"
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - one failure must not lose the other rows
            outcome = "error"
            message = f"{type(error).__name__}: {error}"[:2000]
            self.report.errors.append({"measurement": name, "error": message})
            print(f"failed {name}: {message}", flush=True)
            generator.release_memory()
            return None
        finally:
            seconds = time.monotonic() - started
            self.report.timeline.append(
                {"measurement": name, "seconds": seconds, "outcome": outcome}
            )
            self.report.save()

    def guess_s_per_image(self, case: Case, sampler: common.Sampler) -> float | None:
        """Seconds per image for budget checks: measured for the case, else three times
        its FLOP bound; None (no check) when neither is known."""
        if case.name in self.s_per_image:
            return self.s_per_image[case.name]
        tflop = image_tflop(case.arch, sampler.steps, sampler.guidance_scale, *_size(sampler))
        return 3 * tflop / self.peak if tflop and self.peak else None

    def estimate(
        self, case: Case, sampler: common.Sampler, images: int, extra_s: float = 0.0
    ) -> float | None:
        """Seconds a measurement of `images` images is expected to take (None: unknown)."""
        per_image = self.guess_s_per_image(case, sampler)
        if per_image is None:
            return None
        return (self.load_s or LOAD_GUESS_S) + extra_s + images * per_image

    def annotate(self, row: dict[str, Any], case: Case, sampler: common.Sampler) -> None:
        width, height = _size(sampler)
        tflop = image_tflop(case.arch, sampler.steps, sampler.guidance_scale, width, height)
        target = target_s_per_image(case.arch, sampler.steps, width, height)
        spi = row.get("s_per_image")
        row.update(
            case=case.name,
            arch=case.arch,
            steps=sampler.steps,
            guidance_scale=sampler.guidance_scale,
            width=width,
            height=height,
            **flop_columns(spi, tflop, self.peak),
            target_s_per_image=target,
            meets_target=spi <= target if target and spi else None,
        )
        row.setdefault("compile", None)
        self.report.rows.append(row)
        if row.get("load_s") and not row["compile"]:
            self.load_s = max(self.load_s or 0.0, row["load_s"])


def _size(sampler: common.Sampler) -> tuple[int, int]:
    return sampler.width, sampler.height


def case_list(args: argparse.Namespace) -> list[Case]:
    """Each case with its preset's steps and guidance (unless --steps), on its own model
    (unless --arch)."""
    from koala_batch.presets import preset_for

    cases = []
    for name in args.cases:
        preset = preset_for(name)
        cases.append(
            Case(
                name=name,
                arch=args.arch or name,
                steps=args.steps or preset.steps,
                guidance_scale=float(preset.guidance_scale),
            )
        )
    return cases


def case_sampler(case: Case, size: int) -> common.Sampler:
    return common.Sampler(
        steps=case.steps,
        guidance_scale=case.guidance_scale,
        width=size,
        height=size,
        negative_prompt=common.CARD_NEGATIVE_PROMPT,
    )


def stage_spec(
    args: argparse.Namespace,
    model_dir: Path,
    sampler: common.Sampler,
    batch_size: int,
    compile_mode: str | None,
):
    """The job spec of (b): the stage reads only the model, sampler, compute and output."""
    from koala_batch.spec import spec_from_dict

    storage = common.JobStorage("prompts.parquet", "unused-output", {})
    compute = {
        "batch_size": batch_size,
        "torch_threads": args.threads,
        "compile": compile_mode is not None,
        "compile_mode": compile_mode or "default",
        "compile_cache_dir": str(args.cache_dir / "torch-compile") if args.cache_dir else None,
        "channels_last": tri_state(args.channels_last),
        "fuse_qkv": tri_state(args.fuse_qkv),
    }
    output = {"image_format": args.format, "quality": args.quality}
    raw = common.job_spec(storage, "run", str(model_dir), sampler, compute, output, args.dtype)
    return spec_from_dict(raw)


def encode_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds to encode one image of uniform noise (the worst case) in --format: what each
    of (b)'s calls spends beside the GPU per image."""
    import numpy as np

    from koala_batch.stages.encode import encode_image

    pixels = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        encode_image(pixels, args.format, args.quality)
        times.append(time.perf_counter() - started)
    return {"format": args.format, "size": args.size, "s_per_image": sorted(times)[1]}


def diffusers_decode(vae: Any, image_processor: Any, latents: Any) -> Any:
    """What StableDiffusionXLPipeline does after its loop for output_type="np" (its latent
    unscaling, `vae.decode`, `image_processor.postprocess`), then `from_float` to uint8."""
    from koala_batch.stages.generate import GeneratedImages

    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    return GeneratedImages.from_float(image_processor.postprocess(image, output_type="np"))


def decode_comparison(args: argparse.Namespace) -> dict[str, Any]:
    """koala-batch's decode (`decode_latents`: uint8 on the device, pinned host copy)
    against the pipeline's own VAE decode and image processor, side by side on one VAE
    (SDXL's architecture, random weights; the tiny model's on a dry run): seconds per
    image of each, at --size and --batch, alternating, median of 3."""
    import types

    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    from bench.architectures import SDXL_VAE
    from koala_batch.models.loading import decode_dtype, resolve_dtype
    from koala_batch.stages.generate import decode_latents

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.dry_run:
        vae = common.build_cpu_pipeline().vae
    else:
        vae = AutoencoderKL(**SDXL_VAE)
    model_dtype = resolve_dtype(args.dtype, device)
    dtype = decode_dtype(model_dtype, vae, device)
    vae = vae.to(device, dtype).eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    pipeline = types.SimpleNamespace(vae=vae, watermark=None)
    processor = VaeImageProcessor(vae_scale_factor=factor)
    side = args.size // factor
    latents = torch.randn(
        args.batch,
        vae.config.latent_channels,
        side,
        side,
        generator=torch.Generator().manual_seed(0),
    ).to(device, model_dtype)
    ways = {
        "koala_batch": lambda: decode_latents(pipeline, latents),
        "diffusers": lambda: diffusers_decode(vae, processor, latents),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    outputs: dict[str, Any] = {}
    with torch.inference_mode():
        for name, way in ways.items():  # warm-up: kernels, allocator
            outputs[name] = way()
        for _ in range(3):
            for name, way in ways.items():
                generator.synchronize()
                started = time.perf_counter()
                outputs[name] = way()
                generator.synchronize()
                times[name].append((time.perf_counter() - started) / args.batch)
    ours, theirs = (sorted(times[name])[1] for name in ways)
    same = outputs["koala_batch"].pixels == outputs["diffusers"].pixels
    return {
        "size": args.size,
        "batch": args.batch,
        "decode_dtype": str(dtype).removeprefix("torch."),
        "koala_batch_s_per_image": ours,
        "diffusers_s_per_image": theirs,
        "diffusers_over_koala_batch": theirs / ours,
        "identical_bytes_fraction": float(np.mean(same)),
    }


def measure_case(bench: Bench, case: Case, prompts: Any) -> None:
    """Build the case's model, then (a) and the (b) sweep, side by side."""
    args = bench.args
    sampler = case_sampler(case, args.size)
    model_dir = bench.attempt(
        f"{case.name}: build {case.arch}",
        None,
        lambda: common.prepare_model(case.arch, args.cache_dir),
    )
    if model_dir is None:
        return
    generator.release_memory()  # the build's peak is not the measurements'
    bench.report.extra.setdefault("page_cache_prewarm_s", {})[case.name] = common.warm_page_cache(
        model_dir
    )
    bench.report.extra.setdefault("model_dirs", {})[case.name] = str(model_dir)
    card_prompts = prompts.column("prompt").to_pylist()

    def card() -> dict[str, Any]:
        return generator.card_loop(model_dir, card_prompts, sampler, args.warmup)

    row = (
        bench.attempt(
            f"{case.name}: (a) card loop",
            bench.estimate(case, sampler, args.warmup + args.images),
            card,
        )
        if "card" in args.measure
        else None
    )
    card_rate = None
    if row is not None:
        bench.annotate(row, case, sampler)
        card_rate = row["images_per_s"]
        if row["s_per_image"]:
            bench.s_per_image[case.name] = row["s_per_image"]

    if "breakdown" in args.measure:
        measure_breakdown(bench, case, sampler, model_dir, prompts)
    if "stage" not in args.measure:
        return
    sweep = fit_sweep(bench, case, sampler)
    if not sweep:
        bench.report.skipped.append(
            {"measurement": f"{case.name}: (b) stage", "reason": "no batch size fits the budget"}
        )
        return
    dropped = [size for size in args.sweep if size not in sweep]
    if dropped:
        bench.report.skipped.append(
            {"measurement": f"{case.name}: (b) batch {dropped}", "reason": "budget"}
        )
    spec = stage_spec(args, model_dir, sampler, max(sweep), None)
    work = common.work_rows(spec, prompts)

    def stage() -> list[dict[str, Any]]:
        return generator.stage_loops(spec, work, sweep, args.threads, args.warmup, args.concurrency)

    rows = bench.attempt(f"{case.name}: (b) stage, batch {sweep}", None, stage) or []
    for row in rows:
        row["compile"] = False
        row["ratio_to_a"] = common.ratio(row["images_per_s"], card_rate)
        bench.annotate(row, case, sampler)
        bench.eager[(case.name, row["batch"])] = row
    measured = [row["s_per_image"] for row in rows if row["s_per_image"]]
    if measured:
        bench.s_per_image[case.name] = min(measured)


def measure_breakdown(
    bench: Bench, case: Case, sampler: common.Sampler, model_dir: Path, prompts: Any
) -> None:
    """(b)'s seconds per image in each part of the pipeline call, eager, at --batch."""
    args = bench.args
    spec = stage_spec(args, model_dir, sampler, args.batch, None)
    work = common.work_rows(spec, prompts)
    result = bench.attempt(
        f"{case.name}: (b) breakdown, batch {args.batch}",
        bench.estimate(case, sampler, args.warmup * args.batch + args.images),
        lambda: generator.component_breakdown(spec, work, args.batch, args.threads, args.warmup),
    )
    if result is not None:
        bench.report.extra.setdefault("breakdown", {})[case.name] = result
        bench.report.save()


def fit_sweep(bench: Bench, case: Case, sampler: common.Sampler) -> list[int]:
    """The sweep's batch sizes that fit the budget: --batch first to stay, the largest
    others first to go."""
    args = bench.args
    sweep = sorted(args.sweep)
    while sweep:
        images = sum(args.warmup * size + args.images for size in sweep)
        estimate = bench.estimate(case, sampler, images)
        if estimate is None or estimate <= bench.remaining():
            return sweep
        others = [size for size in sweep if size != args.batch]
        sweep.remove(max(others) if others else sweep[0])
    return sweep


def measure_compiled(bench: Bench, case: Case, mode: str, prompts: Any) -> None:
    """(b) with compute.compile on at --batch; load_s includes compiling and warming up."""
    args = bench.args
    sampler = case_sampler(case, args.size)
    model_dir = bench.report.extra.get("model_dirs", {}).get(case.name)
    name = f"{case.name}: (b) compile={mode}, batch {args.batch}"
    if model_dir is None:
        bench.report.skipped.append({"measurement": name, "reason": "no model"})
        return
    spec = stage_spec(args, Path(model_dir), sampler, args.batch, mode)
    work = common.work_rows(spec, prompts)
    compile_s = bench.compile_s if bench.compile_s is not None else COMPILE_GUESS_S
    estimate = bench.estimate(case, sampler, args.warmup * args.batch + args.images, compile_s)

    def stage() -> list[dict[str, Any]]:
        return generator.stage_loops(
            spec, work, [args.batch], args.threads, args.warmup, args.concurrency
        )

    import torch

    torch._dynamo.utils.counters.clear()
    rows = bench.attempt(name, estimate, stage) or []
    # Graphs, graph breaks and recompiles of this measurement (warm-up included): more
    # graphs than the warm-up's means the timed calls compiled too.
    dynamo = {
        key: dict(values)
        for key, values in torch._dynamo.utils.counters.items()
        if key in ("stats", "frames", "graph_break", "recompiles")
    }
    # Compiled graphs keep the stage's modules alive: free them for the next measurement.
    torch._dynamo.reset()
    generator.release_memory()
    card_rate = next(
        (
            r["images_per_s"]
            for r in bench.report.rows
            if r["case"] == case.name and r["variant"] == "a"
        ),
        None,
    )
    eager = bench.eager.get((case.name, args.batch))
    eager_rate = eager["images_per_s"] if eager else None
    for row in rows:
        row["compile"] = mode
        row["ratio_to_a"] = common.ratio(row["images_per_s"], card_rate)
        row["ratio_to_eager"] = common.ratio(row["images_per_s"], eager_rate)
        row["dynamo_counters"] = dynamo
        # The next compile of the same shapes hits the on-disk caches: its own figure.
        bench.compile_s = max(0.0, row["load_s"] - (bench.load_s or 0.0))
        bench.annotate(row, case, sampler)


# ---------------------------------------------------------------------------------------
# Main


def main(argv: Sequence[str] | None = None) -> int:
    """Run every measurement that fits the budget; 0 when the run finished."""
    started = time.monotonic()
    args = parse_args(argv)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # on CPU even on a GPU machine
    common.quiet_libraries()
    # No network where this runs: nothing may try a download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    wheels = bootstrap(args.wheels)

    import torch

    from koala_batch.stages.generate import CALLS_PER_ACTOR

    args.concurrency = CALLS_PER_ACTOR
    torch.set_num_threads(args.threads)
    if not torch.cuda.is_available() and (args.arch or "") not in common.SMALL_ARCHITECTURES:
        # The real architectures are several GB and take minutes per image on a CPU.
        raise SystemExit("no CUDA device visible: on a CPU, use --dry-run (or --arch cpu)")
    origins = module_origins(WHEEL_MODULES, wheels["target"])
    if wheels["needed"]:
        print(
            f"installed {len(wheels['installed'])} wheels from {args.wheels} into "
            f"{wheels['target']}: "
            + ", ".join(
                f"{n} {o['version'] or ''}" for n, o in origins.items() if o["from_wheels"]
            ),
            flush=True,
        )
    environment = common.environment()
    peak, peak_matched = peak_tflops(environment["device"])
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    cases = case_list(args)
    settings = {
        "dry_run": args.dry_run,
        "cases": [vars(case) for case in cases],
        "width": args.size,
        "height": args.size,
        "images": args.images,
        "batch": args.batch,
        "sweep": args.sweep,
        "compile_modes": args.compile_modes,
        "measure": args.measure,
        "dtype_a": "float16 on CUDA, float32 on CPU (the card's)",
        "dtype_b": args.dtype,
        "channels_last": args.channels_last,
        "fuse_qkv": args.fuse_qkv,
        "image_format": args.format,
        "quality": args.quality,
        "threads": args.threads,
        "warmup_calls": args.warmup,
        "concurrency_b": args.concurrency,
        "negative_prompt": common.CARD_NEGATIVE_PROMPT,
        "budget_s": args.budget_s,
        "grace_s": args.grace_s,
        "peak_tflops": peak,
        "peak_matched": peak_matched,
        "flop_model": {
            "unet_tflop_per_128x128_latent": UNET_TFLOP_AT_128,
            "vae_decode_tflop_per_1024x1024_image": VAE_DECODE_TFLOP_AT_1024,
            "latents_per_step": "2 with guidance > 1 (classifier-free guidance), else 1",
        },
        "targets_s_per_image_at_1024": {
            f"{arch}, {steps} steps": seconds
            for (arch, steps), seconds in TARGET_S_PER_IMAGE.items()
        },
        "prompts": str(common.SAMPLE_PROMPTS.relative_to(common.REPO_ROOT)),
    }
    report = Report(
        path=args.out / f"{NAME}-{common.slug(environment['device'])}-{stamp}.json",
        summary_path=args.out / "summary.md",
        environment=environment,
        settings=settings,
        started=started,
    )
    report.extra["wheels"] = wheels
    report.extra["modules"] = origins
    bench = Bench(args=args, report=report, peak=peak, deadline=started + args.budget_s)
    stop_at_hard_limit(report, started + args.budget_s + args.grace_s)

    report.extra["encode"] = bench.attempt("encode cost", None, lambda: encode_cost(args))
    if "decode" in args.measure:
        report.extra["decode"] = bench.attempt(
            "decode: koala-batch vs diffusers", None, lambda: decode_comparison(args)
        )
        generator.release_memory()  # the VAE is gone with decode_comparison's frame
    prompts = common.prompt_table(args.images)
    for case in cases:
        measure_case(bench, case, prompts)
    for mode in args.compile_modes:
        for case in cases:
            measure_compiled(bench, case, mode, prompts)
    if not args.compile_modes:
        report.skipped.append({"measurement": "(b) compile", "reason": "no --compile-modes"})

    signal.alarm(0)
    report.environment["load_average"] = common.environment()["load_average"]
    report.extra["ray_imported"] = "ray" in sys.modules
    report.extra["s3fs_imported"] = "s3fs" in sys.modules
    report.status = "finished"
    report.save()
    print(report.summary())
    print(f"wrote {report.path} and {report.summary_path}")
    # The promise a GPU machine without Ray relies on: checked, not assumed.
    if "ray" in sys.modules or "s3fs" in sys.modules:
        raise RuntimeError("the generator path imported ray or s3fs")
    return 0


def stop_at_hard_limit(report: Report, at: float) -> None:
    """Past budget + grace, write what there is and exit at once: a measurement that
    overruns its estimate (a slow compile, a hung call) must not lose the run."""

    def handler(signum: int, frame: Any) -> None:
        report.status = "stopped at the hard limit"
        report.save()
        print(report.summary(), flush=True)
        print(f"stopped at the hard limit; wrote {report.path}", flush=True)
        os._exit(3)  # worker threads may still hold the GPU: no orderly shutdown

    signal.signal(signal.SIGALRM, handler)
    signal.alarm(max(1, int(at - time.monotonic())))


if __name__ == "__main__":
    raise SystemExit(main())
