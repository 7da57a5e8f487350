"""Accelerations benchmark: speed and pixel drift of the guidance cut-off and DeepCache.

Loads the pipeline once (koala_batch.models.loading.load_pipeline) and makes the same prompts with
the same per-image seeds (one torch.Generator per image, as koala_batch.stages.generate does)
under each variant: exact, guidance cut-off at a fraction of the steps, DeepCache at an
interval, or both. Each variant gets one untimed warm-up call, then `--images` images in
calls of `--batch`. Reports s/image, the speed-up over exact, the U-Net work done, and how
far the pixels moved from the exact images (uint8, 0-255).

    python -m bench.accelerations --arch cpu --size 256 --steps 8 --images 8 --batch 4
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench import common

NAME = "accelerations"
DEFAULT_VARIANTS = "exact,cutoff-0.5,cutoff-0.3,deepcache-2,deepcache-3,cutoff-0.5+deepcache-3"


@dataclass(frozen=True)
class Variant:
    """One setting of the accelerations: `generation.guidance_cutoff` and
    `generation.deep_cache_interval` as a job spec gives them."""

    name: str
    guidance_cutoff: float | None = None
    deep_cache_interval: int | None = None


def parse_variant(text: str) -> Variant:
    """'exact', 'cutoff-F', 'deepcache-N', or several joined with '+'."""
    cutoff: float | None = None
    interval: int | None = None
    for part in text.split("+"):
        kind, _, value = part.partition("-")
        try:
            if kind == "exact" and not value:
                continue
            if kind == "cutoff":
                cutoff = float(value)
                if not 0.0 < cutoff <= 1.0:
                    raise ValueError
                continue
            if kind == "deepcache":
                interval = int(value)
                if interval < 2:
                    raise ValueError
                continue
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(
            f"bad variant {part!r}: expected exact, cutoff-F (0 < F <= 1), deepcache-N (N >= 2)"
        )
    return Variant(text, cutoff, interval)


def parse_variants(text: str) -> list[Variant]:
    variants = [parse_variant(part.strip()) for part in text.split(",") if part.strip()]
    if not variants:
        raise argparse.ArgumentTypeError("no variants given")
    return variants


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.accelerations",
        description=__doc__.split("\n\n")[0],
    )
    common.add_model_arguments(parser)
    parser.add_argument("--images", type=int, default=8, help="images per variant (default: 8)")
    parser.add_argument("--batch", type=int, default=4, help="prompts per call (default: 4)")
    parser.add_argument(
        "--variants",
        type=parse_variants,
        default=parse_variants(DEFAULT_VARIANTS),
        help="comma-separated: exact, cutoff-F, deepcache-N, or both joined with + "
        f"(default: {DEFAULT_VARIANTS}); exact always runs first, as the reference",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="float32",
        help="model.dtype; auto = bf16 on CUDA, fp32 on CPU (default: float32)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads (default: all cores)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time every variant this many times, in turn, and keep each one's fastest: "
        "steadier on a shared machine (default: 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="job seed (default: 0)")
    parser.add_argument("-v", "--verbose", action="store_true", help="koala-batch's info logs")
    return parser.parse_args(argv)


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def unet_work(unet: Any) -> Iterator[dict[str, int]]:
    """Counts U-Net calls and the latents they take (guidance doubles them)."""
    counts = {"unet_calls": 0, "latent_rows": 0}

    def count(module: Any, args: tuple[Any, ...]) -> None:
        counts["unet_calls"] += 1
        counts["latent_rows"] += int(args[0].shape[0])

    handle = unet.register_forward_pre_hook(count)
    try:
        yield counts
    finally:
        handle.remove()


def run_variant(
    pipeline: Any,
    variant: Variant,
    prompts: list[str],
    seeds: list[int],
    sampler: common.Sampler,
    batch_size: int,
) -> tuple[float, np.ndarray, dict[str, int]]:
    """Seconds for all images after one warm-up call, the uint8 images, the U-Net work."""
    import torch

    from koala_batch.models.accelerations import DeepCache, guidance_cutoff_kwargs

    extra = guidance_cutoff_kwargs(variant.guidance_cutoff) if variant.guidance_cutoff else {}
    deep_cache = (
        DeepCache(pipeline.unet, variant.deep_cache_interval)
        if variant.deep_cache_interval
        else None
    )

    def call(start: int) -> np.ndarray:
        batch_prompts = prompts[start : start + batch_size]
        generators = [
            torch.Generator(device=pipeline.device).manual_seed(seed)
            for seed in seeds[start : start + batch_size]
        ]
        if deep_cache is not None:
            deep_cache.reset()
        negative = sampler.negative_prompt
        with torch.inference_mode():
            result = pipeline(
                prompt=batch_prompts,
                negative_prompt=[negative] * len(batch_prompts) if negative else None,
                num_inference_steps=sampler.steps,
                guidance_scale=sampler.guidance_scale,
                width=sampler.width,
                height=sampler.height,
                generator=generators,
                output_type="np",
                **extra,
            )
        # As koala_batch.stages.generate turns the pipeline's floats into pixels.
        return (np.asarray(result.images) * 255).round().clip(0, 255).astype(np.uint8)

    try:
        call(0)
        synchronize()
        deep_before = deep_cache.full_steps if deep_cache else 0
        with unet_work(pipeline.unet) as work:
            started = time.perf_counter()
            images = np.concatenate([call(i) for i in range(0, len(prompts), batch_size)])
            synchronize()
            seconds = time.perf_counter() - started
        work["deep_steps"] = (
            deep_cache.full_steps - deep_before if deep_cache else work["unet_calls"]
        )
    finally:
        if deep_cache is not None:
            deep_cache.remove()
    return seconds, images, work


def pixel_drift(images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How far images moved from the reference, in uint8 levels (0-255)."""
    difference = np.abs(images.astype(np.int16) - reference.astype(np.int16))
    mse = float((difference.astype(np.float64) ** 2).mean())
    return {
        "mean_abs_diff": float(difference.mean()),
        "max_abs_diff": float(difference.max()),
        "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse)),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.start_run(args.verbose)
    import torch

    from koala_batch.keys import derived_seed
    from koala_batch.models.loading import load_pipeline

    variants: list[Variant] = [Variant("exact")] + [
        v for v in args.variants if (v.guidance_cutoff, v.deep_cache_interval) != (None, None)
    ]
    sampler = common.sampler_from_args(args)
    model_dir = common.prepare_model(args.arch, args.cache_dir)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    pipeline = load_pipeline(str(model_dir), dtype=args.dtype)
    synchronize()
    load_s = time.perf_counter() - started

    table = common.prompt_table(args.images)
    prompts = table.column("prompt").to_pylist()
    seeds = [derived_seed(args.seed, row_id, 0) for row_id in table.column("id").to_pylist()]

    best: dict[str, float] = {}
    images: dict[str, np.ndarray] = {}
    work: dict[str, dict[str, int]] = {}
    for _ in range(max(1, args.rounds)):
        for variant in variants:
            seconds, made, counts = run_variant(
                pipeline, variant, prompts, seeds, sampler, args.batch
            )
            best[variant.name] = min(seconds, best.get(variant.name, seconds))
            # Same seeds, same settings: every round makes the same pixels; keep the first.
            images.setdefault(variant.name, made)
            work[variant.name] = counts

    exact_s = best["exact"]
    rows: list[dict[str, Any]] = []
    for variant in variants:
        seconds = best[variant.name]
        rows.append(
            {
                "variant": variant.name,
                "guidance_cutoff": variant.guidance_cutoff,
                "deep_cache_interval": variant.deep_cache_interval,
                "images": len(prompts),
                "seconds": seconds,
                **common.rate(len(prompts), seconds),
                "speedup": common.ratio(exact_s, seconds),
                **work[variant.name],
                **pixel_drift(images[variant.name], images["exact"]),
            }
        )

    settings = {
        "arch": args.arch,
        "model_dir": str(model_dir),
        "sampler": common.as_dict(sampler),
        "images": args.images,
        "batch": args.batch,
        "dtype": str(pipeline.dtype).removeprefix("torch."),
        "threads": args.threads,
        "rounds": args.rounds,
        "seed": args.seed,
        "warmup_calls": 1,
        "variants": [common.as_dict(v) for v in variants],
        "prompts": str(common.SAMPLE_PROMPTS.relative_to(common.REPO_ROOT)),
    }
    results = {"load_s": load_s, "variants": rows}
    columns = [
        "variant",
        "seconds",
        "s_per_image",
        "speedup",
        "unet_calls",
        "deep_steps",
        "latent_rows",
        "mean_abs_diff",
        "max_abs_diff",
        "psnr_db",
    ]
    title = (
        f"{NAME}: {args.arch} {sampler.width}x{sampler.height}, {sampler.steps} steps, "
        f"guidance {sampler.guidance_scale}, batch {args.batch}, {args.threads} threads, "
        f"{common.device_name()}"
    )
    common.print_table(rows, columns, title)
    print(
        "speedup = exact s/image / the row's; deep_steps = U-Net calls that ran the deep "
        "blocks; latent_rows = latents through the U-Net (guidance doubles them); "
        "diffs vs exact in uint8 levels"
    )
    print(f"wrote {common.write_result(NAME, settings, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
