"""Generator benchmark: (a) the KOALA model-card loop vs (b) koala-batch's generation stage.

Both run in this process on the same prompts, sampler settings and image size:
(a) loads StableDiffusionXLPipeline as the model card does (fp16 on CUDA, fp32 on CPU)
and calls it once per prompt; (b) builds koala_batch.stages.generate.GenerateImages once and
calls it on work-row tables of `--batch` rows, `--concurrency` calls at once as a job's
actor does. The stage encodes its images (--format); (a) does too with --card-encode.
Model load is timed apart from the loop.

    python -m bench.generator --arch cpu --size 256 --steps 4 --batch 4 --images 32
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import common

NAME = "generator"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.generator",
        description=__doc__.split("\n\n")[0],
    )
    common.add_model_arguments(parser)
    parser.add_argument("--batch", type=int, default=4, help="prompts per stage call (default: 4)")
    parser.add_argument(
        "--sweep",
        type=common.parse_int_list,
        default=None,
        help="run (b) at each of these batch sizes, e.g. 1,2,4,8 (replaces --batch)",
    )
    parser.add_argument("--images", type=int, default=32, help="images per variant (default: 32)")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="model.dtype of (b); auto = bf16 on CUDA, fp32 on CPU. (a) uses the card's "
        "fp16 on CUDA, fp32 on CPU (default: auto)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads for both variants (default: all cores)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed calls before each timed loop (default: 1)",
    )
    common.add_stage_arguments(parser)
    parser.add_argument(
        "--card-encode",
        action="store_true",
        help="(a) also encodes each image in --format, as (b) does (the card does not)",
    )
    parser.add_argument(
        "--variants",
        default="a,b",
        help="which variants to run: a, b or a,b (default: a,b)",
    )
    return parser.parse_args(argv)


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def card_call(
    pipe: Any,
    prompt: str,
    sampler: common.Sampler,
    encode_format: str | None = None,
    quality: int = 95,
) -> Any:
    """One image as the card makes it (a PIL image), with the shared sampler settings;
    saved to memory in `encode_format` if given, as the product's stage does."""
    image = pipe(
        prompt=prompt,
        negative_prompt=sampler.negative_prompt,
        num_inference_steps=sampler.steps,
        guidance_scale=sampler.guidance_scale,
        width=sampler.width,
        height=sampler.height,
    ).images[0]
    if encode_format:
        from koala_batch.stages.encode import encode_image

        # The card's usage, then what the product does with an image: koala-batch's encoder.
        encode_image(np.asarray(image), encode_format, quality)
    return image


def card_loop(
    model_dir: Path,
    prompts: list[str],
    sampler: common.Sampler,
    warmup: int,
    encode_format: str | None = None,
    quality: int = 95,
) -> dict[str, Any]:
    """(a) The model card's usage: one pipeline call per prompt, no batching."""
    import diffusers
    import torch
    from diffusers import StableDiffusionXLPipeline

    diffusers.utils.logging.disable_progress_bar()  # noise in the table, no cost of note
    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    started = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=dtype, use_safetensors=True)
    pipe = pipe.to("cuda" if cuda else "cpu")
    synchronize()
    load_s = time.perf_counter() - started
    pipe.set_progress_bar_config(disable=True)

    started = time.perf_counter()
    for prompt in prompts[:warmup]:
        card_call(pipe, prompt, sampler, encode_format, quality)
    synchronize()
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    for prompt in prompts:
        card_call(pipe, prompt, sampler, encode_format, quality)
    synchronize()
    seconds = time.perf_counter() - started
    result = {
        "variant": "a",
        "description": "model-card loop: pipe(prompt=p, negative_prompt=n), one image per call"
        + (f", saved as {encode_format}" if encode_format else ""),
        "dtype": str(dtype).removeprefix("torch."),
        "batch": 1,
        "images": len(prompts),
        "load_s": load_s,
        "warmup_s": warmup_s,
        "seconds": seconds,
        **common.rate(len(prompts), seconds),
        "pipeline_calls": len(prompts),
        "errors": 0,
        "peak_gpu_gib": peak_memory_gib(),
    }
    del pipe
    release_memory()
    return result


def counting_stage_class():
    """GenerateImages counting its pipeline calls: more calls than batches means batches
    were split or images retried alone (errors, NaN pixels), which distorts the timing."""
    from koala_batch.stages.generate import GenerateImages

    class CountingGenerateImages(GenerateImages):
        pipeline_calls = 0

        def run_pipeline(self, prompts, negative_prompts, seeds, **pipeline_kwargs):
            self.pipeline_calls += 1
            return super().run_pipeline(prompts, negative_prompts, seeds, **pipeline_kwargs)

    return CountingGenerateImages


def stage_loops(
    spec: Any, work: Any, batch_sizes: list[int], threads: int, warmup: int, concurrency: int
) -> list[dict[str, Any]]:
    """(b) koala-batch's generation stage, built once, called on tables of work rows."""
    started = time.perf_counter()
    stage = counting_stage_class()(spec, torch_threads=threads)
    synchronize()
    load_s = time.perf_counter() - started
    dtype = str(stage.pipeline.dtype).removeprefix("torch.") if stage.pipeline else None
    results = []
    for batch_size in batch_sizes:
        tables = common.batches(work, batch_size)
        started = time.perf_counter()
        common.run_stage(stage, tables[:warmup], concurrency)
        synchronize()
        warmup_s = time.perf_counter() - started
        stage.pipeline_calls = 0
        started = time.perf_counter()
        ok = common.run_stage(stage, tables, concurrency)
        synchronize()
        seconds = time.perf_counter() - started
        results.append(
            {
                "variant": "b",
                "description": "koala_batch.stages.generate.GenerateImages in-process "
                f"(generate and encode, {concurrency} calls at once)",
                "dtype": dtype,
                "batch": batch_size,
                "images": work.num_rows,
                "load_s": load_s,
                "warmup_s": warmup_s,
                "seconds": seconds,
                **common.rate(work.num_rows, seconds),
                "pipeline_calls": stage.pipeline_calls,
                "errors": work.num_rows - ok,
                "peak_gpu_gib": peak_memory_gib(),
            }
        )
    del stage
    release_memory()
    return results


# The pipeline's parts timed by component_breakdown (modules called through forward).
TIMED_MODULES = ("text_encoder", "text_encoder_2", "unet")


def component_breakdown(
    spec: Any, work: Any, batch_size: int, threads: int, warmup: int
) -> dict[str, Any]:
    """Where (b)'s time goes: seconds per image in each text encoder, the U-Net and the
    VAE decode, and the rest of the call (scheduler, latents, uint8 and host copy).

    Calls run one at a time without encoding, each part between two device
    synchronisations, so the parts add up to the call; the synchronisations cost a little
    overlap, and "call" is slower than (b)'s steady state by that much.
    """
    import functools
    from collections import defaultdict

    from koala_batch.schemas import Col

    stage = counting_stage_class()(spec, torch_threads=threads)
    pipe = stage.pipeline
    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def timed(name: str, function: Any) -> Any:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            synchronize()
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                synchronize()
                seconds[name] += time.perf_counter() - started
                calls[name] += 1

        return wrapper

    for name in TIMED_MODULES:
        module = getattr(pipe, name, None)
        if module is not None:
            module.forward = timed(name, module.forward)  # an instance attribute wins
    pipe.vae.decode = timed("vae_decode", pipe.vae.decode)
    generate = timed("call", stage.generate)

    def run(tables: list[Any]) -> None:
        for table in tables:
            generate(
                table.column(Col.PROMPT).to_pylist(),
                table.column(Col.NEGATIVE_PROMPT).to_pylist(),
                table.column(Col.SEED).to_pylist(),
            )

    tables = common.batches(work, batch_size)
    run(tables[:warmup])
    seconds.clear()
    calls.clear()
    run(tables)
    images = work.num_rows
    parts = {name: seconds[name] / images for name in (*TIMED_MODULES, "vae_decode")}
    per_image = seconds["call"] / images
    result = {
        "batch": batch_size,
        "images": images,
        "dtype": str(pipe.dtype).removeprefix("torch."),
        "s_per_image": per_image,
        "parts_s_per_image": {**parts, "other": per_image - sum(parts.values())},
        "calls": dict(calls),
        "unet_s_per_forward": seconds["unet"] / calls["unet"] if calls["unet"] else None,
        "vae_decode_s_per_image": parts["vae_decode"],
        "peak_gpu_gib": peak_memory_gib(),
    }
    del stage, pipe
    release_memory()
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.quiet_libraries()
    import torch

    from koala_batch.spec import spec_from_dict

    variants = {part.strip() for part in args.variants.split(",") if part.strip()}
    if not variants or not variants <= {"a", "b"}:
        raise SystemExit(f"--variants: expected a, b or a,b (got {args.variants!r})")
    sampler = common.sampler_from_args(args)
    batch_sizes = args.sweep or [args.batch]
    model_dir = common.prepare_model(args.arch, args.cache_dir)
    prewarm_s = common.warm_page_cache(model_dir)
    torch.set_num_threads(args.threads)

    prompts = common.prompt_table(args.images)
    # The stage's own input: the spec only names the model, sampler and sizes here.
    storage = common.JobStorage("prompts.parquet", "unused-output", {})
    compute = {"batch_size": max(batch_sizes), "torch_threads": args.threads}
    output = {"image_format": args.format, "quality": args.quality}
    raw = common.job_spec(
        storage, "run", str(model_dir), sampler, compute, output, dtype=args.dtype
    )
    spec = spec_from_dict(raw)
    work = common.work_rows(spec, prompts)

    rows: list[dict[str, Any]] = []
    if "a" in variants:
        card_prompts = prompts.column("prompt").to_pylist()
        card_format = args.format if args.card_encode else None
        rows.append(
            card_loop(model_dir, card_prompts, sampler, args.warmup, card_format, args.quality)
        )
    if "b" in variants:
        rows.extend(
            stage_loops(spec, work, batch_sizes, args.threads, args.warmup, args.concurrency)
        )
    card = next((row for row in rows if row["variant"] == "a"), None)
    for row in rows:
        row["ratio_to_a"] = common.ratio(
            row["images_per_s"], card["images_per_s"] if card else None
        )

    settings = {
        "arch": args.arch,
        "model_dir": str(model_dir),
        "sampler": common.as_dict(sampler),
        "images": args.images,
        "batch_sizes": batch_sizes,
        "dtype_b": args.dtype,
        "threads": args.threads,
        "warmup_calls": args.warmup,
        "image_format_b": args.format,
        "quality": args.quality,
        "card_encode": args.card_encode,
        "concurrency_b": args.concurrency,
        "variants": sorted(variants),
        "prompts": str(common.SAMPLE_PROMPTS.relative_to(common.REPO_ROOT)),
    }
    results = {"page_cache_prewarm_s": prewarm_s, "variants": rows}
    columns = [
        "variant",
        "dtype",
        "batch",
        "images",
        "load_s",
        "warmup_s",
        "seconds",
        "s_per_image",
        "images_per_s",
        "ratio_to_a",
        "pipeline_calls",
        "errors",
    ]
    print_title = (
        f"{NAME}: {args.arch} {sampler.width}x{sampler.height}, {sampler.steps} steps, "
        f"guidance {sampler.guidance_scale}, {args.threads} threads, {common.device_name()}"
    )
    common.print_table(rows, columns, print_title)
    print("ratio_to_a = images/s of the row / images/s of (a); b/a is the stage's speed-up")
    print(f"wrote {common.write_result(NAME, settings, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
