"""Job benchmark: (c) the whole job, Parquet to committed shards, vs (b) the in-process loop.

Both are timed in one run with start-up included: (c) is koala_batch.run(spec) end to
end (ray.init, actor start, model load, read, generate, encode, write, commit) on a
local directory or, with --s3, on moto's S3 server on 127.0.0.1; (b) is model load plus
the generation stage (generate and encode) called in this process on the same prompts,
as many calls at once as a job's actor takes. Library imports are done first and
reported apart.

    python -m bench.job --arch cpu --size 256 --steps 4 --batch 4 --images 96 --actors 2
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

from bench import common

NAME = "job"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.job",
        description=__doc__.split("\n\n")[0],
    )
    common.add_model_arguments(parser)
    parser.add_argument(
        "--batch", type=int, default=4, help="compute.batch_size, prompts per call (default: 4)"
    )
    parser.add_argument("--images", type=int, default=96, help="images (default: 96)")
    common.add_compute_arguments(parser)
    parser.add_argument(
        "--threads-per-actor",
        type=int,
        default=None,
        help="compute.torch_threads (default: koala-batch's, the actor's CPUs)",
    )
    parser.add_argument(
        "--loop-threads",
        type=int,
        default=None,
        help="torch threads of the in-process loop (b) (default: actors x threads per actor, "
        "the same compute as the job's generators)",
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="model.dtype (default: auto = bf16 on CUDA, fp32 on CPU)",
    )
    common.add_stage_arguments(parser)
    parser.add_argument(
        "--order",
        choices=("bc", "cb"),
        default="bc",
        help="which of (b) and (c) runs first (default: bc)",
    )
    parser.add_argument(
        "--variants", default="b,c", help="which variants to run: b, c or b,c (default: b,c)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="koala-batch's info logs")
    return parser.parse_args(argv)


def import_libraries() -> float:
    """Import what both variants use, so neither pays for it in its timing."""
    started = time.perf_counter()
    import diffusers  # noqa: F401
    import ray
    import ray.data  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import koala_batch.stages.generate  # noqa: F401

    return time.perf_counter() - started


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def in_process_loop(
    spec: Any, work: Any, batch_size: int, threads: int, concurrency: int
) -> dict[str, Any]:
    """(b) Model load plus the generation stage called on work-row tables, timed together."""
    import torch

    from koala_batch.stages.generate import GenerateImages

    tables = common.batches(work, batch_size)
    started = time.perf_counter()
    stage = GenerateImages(spec, torch_threads=threads)
    synchronize()
    load_s = time.perf_counter() - started
    ok = common.run_stage(stage, tables, concurrency)
    synchronize()
    wall_s = time.perf_counter() - started
    del stage
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {
        "variant": "b",
        "description": "in-process loop: GenerateImages built, then called per batch "
        f"({concurrency} calls at once; generate and encode)",
        "images": work.num_rows,
        "startup_s": load_s,
        "wall_s": wall_s,
        **common.rate(work.num_rows, wall_s),
        "images_ok": ok,
        "images_failed": work.num_rows - ok,
        "threads": threads,
        "concurrency": concurrency,
    }


def whole_job(spec: dict[str, Any], storage_kind: str) -> dict[str, Any]:
    """(c) koala_batch.run from Parquet to committed shards, timed end to end."""
    import koala_batch

    started = time.perf_counter()
    record = koala_batch.run(spec)
    wall_s = time.perf_counter() - started
    counts = record["counts"]
    return {
        "variant": "c",
        "description": f"koala_batch.run, Parquet to committed shards ({storage_kind})",
        "images": counts["images_written_this_run"],
        "wall_s": wall_s,
        **common.rate(counts["images_written_this_run"], wall_s),
        "images_ok": counts["images_ok"],
        "images_failed": counts["images_failed"],
        "record_wall_time_s": record["wall_time_s"],
        "record_images_per_s": record["images_per_s"],
        "counts": counts,
        "image_bytes": sum(shard["image_bytes"] for shard in record["shards"]),
        "record_timeline": record.get("timeline"),
        "record_generators": record.get("generators"),
        # From the job's start to its first generated image: start-up plus one batch.
        "first_image_s": (record.get("timeline") or {}).get("first_image_s"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.start_run(args.verbose)
    variants = {part.strip() for part in args.variants.split(",") if part.strip()}
    if not variants or not variants <= {"b", "c"}:
        raise SystemExit(f"--variants: expected b, c or b,c (got {args.variants!r})")
    sampler = common.sampler_from_args(args)
    model_dir = common.prepare_model(args.arch, args.cache_dir)
    import_s = import_libraries()
    prewarm_s = common.warm_page_cache(model_dir)
    from koala_batch.spec import spec_from_dict

    threads_per_actor = args.threads_per_actor or max(1, int(args.cpus_per_actor))
    loop_threads = args.loop_threads or args.actors * threads_per_actor
    compute = common.compute_section(args, torch_threads=threads_per_actor)
    storage_kind = "moto S3 on 127.0.0.1" if args.s3 else "local files"
    prompts = common.prompt_table(args.images)

    rows: dict[str, dict[str, Any]] = {}
    raw_spec: dict[str, Any] = {}
    with common.job_storage(prompts, s3=args.s3, keep=args.keep) as storage:
        raw_spec = common.job_spec(
            storage,
            "job",
            str(model_dir),
            sampler,
            compute,
            {
                "image_format": args.format,
                "quality": args.quality,
                "rows_per_shard": args.rows_per_shard,
            },
            dtype=args.dtype,
        )
        for variant in args.order:
            if variant not in variants:
                continue
            if variant == "b":
                spec = spec_from_dict(raw_spec)
                work = common.work_rows(spec, prompts)
                rows["b"] = in_process_loop(spec, work, args.batch, loop_threads, args.concurrency)
            else:
                rows["c"] = whole_job(raw_spec, storage_kind)

    c_over_b = common.ratio(
        rows.get("c", {}).get("images_per_s"), rows.get("b", {}).get("images_per_s")
    )
    for row in rows.values():
        row["ratio_to_b"] = common.ratio(row["images_per_s"], rows.get("b", {}).get("images_per_s"))
        row["steady_images_per_s"] = steady_rate(row, args.batch)
    # Start-up apart: the rate once generating, (c) from its first image to its last, (b)
    # after its model load. What start-up costs a job shrinks with its length; this does not.
    steady_c_over_b = common.ratio(
        rows.get("c", {}).get("steady_images_per_s"), rows.get("b", {}).get("steady_images_per_s")
    )
    settings = {
        "arch": args.arch,
        "model_dir": str(model_dir),
        "sampler": common.as_dict(sampler),
        "images": args.images,
        "batch_size": args.batch,
        "dtype": args.dtype,
        "storage": storage_kind,
        "actors": args.actors,
        "cpus_per_actor": args.cpus_per_actor,
        "threads_per_actor": threads_per_actor,
        "loop_threads": loop_threads,
        "ray_local_num_cpus": common.local_ray_cpus(args.local_cpus),
        "rows_per_shard": args.rows_per_shard,
        "image_format": args.format,
        "quality": args.quality,
        "concurrency_b": args.concurrency,
        "order": args.order,
        "variants": sorted(variants),
        "spec": common.masked_spec(raw_spec),
    }
    results = {
        "import_s": import_s,
        "page_cache_prewarm_s": prewarm_s,
        "c_over_b": c_over_b,
        "steady_c_over_b": steady_c_over_b,
        "variants": list(rows.values()),
    }
    columns = [
        "variant",
        "images",
        "startup_s",
        "first_image_s",
        "wall_s",
        "s_per_image",
        "images_per_s",
        "ratio_to_b",
        "steady_images_per_s",
        "images_ok",
        "images_failed",
        "record_wall_time_s",
    ]
    title = (
        f"{NAME}: {args.arch} {sampler.width}x{sampler.height}, {sampler.steps} steps, "
        f"batch {args.batch}, {args.actors} actors x {threads_per_actor} threads, "
        f"{storage_kind}, {common.device_name()}"
    )
    common.print_table([rows[v] for v in args.order if v in rows], columns, title)
    if "c" in rows:
        print(f"counts: {rows['c']['counts']}")
        print(f"timeline: {rows['c']['record_timeline']}")
        generators = rows["c"]["record_generators"] or {}
        busy = [actor["busy_fraction"] for actor in generators.get("per_actor", [])]
        print(f"generator busy fraction: {generators.get('busy_fraction')} (per actor: {busy})")
    print(f"c/b = {c_over_b:.3f} (target >= 0.95)" if c_over_b else "c/b: needs both b and c")
    if steady_c_over_b:
        print(f"c/b once generating (start-up apart) = {steady_c_over_b:.3f}")
    print(f"imports {import_s:.1f} s and page-cache warm-up {prewarm_s:.1f} s are not timed")
    print(f"wrote {common.write_result(NAME, settings, results)}")
    return 0


def steady_rate(row: dict[str, Any], batch_size: int) -> float | None:
    """Images/s once generating: (c) between its first and last image (the first batch's
    images counted out), (b) after its start-up."""
    timeline = row.get("record_timeline")
    if timeline:
        first, last = timeline.get("first_image_s"), timeline.get("last_image_s")
        if first is None or last is None or last <= first:
            return None
        return (row["images_ok"] - batch_size) / (last - first)
    seconds = row["wall_s"] - (row.get("startup_s") or 0.0)
    return row["images"] / seconds if seconds > 0 else None


if __name__ == "__main__":
    raise SystemExit(main())
