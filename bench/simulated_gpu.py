"""Simulated-GPU benchmark: the whole job with a generator that sleeps instead of computing.

The generation stage is replaced (koala_batch.Substitutes(generator_cls=...)) by one that
loads no model, sleeps --gpu-seconds per batch as a GPU would be busy, and returns
full-size images with realistic content (smooth gradients, shapes, mild noise: PNGs of
about 2 MB at 1024x1024, not zeros). So on a CPU machine it measures whether the rest
of the pipeline (pixel transfer, PNG/JPEG/WebP encoding, writing, committing) keeps the
GPUs busy at real image sizes. Every sleep is logged, per actor process; the GPU busy
fraction is total sleep / (actors x (last sleep end - first sleep start)).

    python -m bench.simulated_gpu --size 1024 --batch 4 --images 200 --actors 2 \\
        --gpu-seconds 1.0 --format png,jpeg,webp
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common
from koala_batch.stages.generate import GenerateImages

NAME = "simulated_gpu"
FORMATS = ("png", "jpeg", "webp")


def simulated_generator(
    seconds_per_batch: float, calls_dir: Path, pool_size: int = 4
) -> type[GenerateImages]:
    """A GenerateImages that sleeps `seconds_per_batch` per pipeline call and returns
    synthetic uint8 images; each call's sleep is logged to calls_dir/{pid}.log.

    Defined inside this function so cloudpickle ships it to Ray workers by value; it
    needs nothing from this module there.
    """
    calls_path = str(calls_dir)  # a plain string pickles anywhere

    def synthetic_pool(width: int, height: int, seed: int = 0) -> tuple[list[Any], Any]:
        """A few base pictures and one noise field, made once per actor: per-seed images
        are cheap combinations of them, so making content costs little CPU."""
        import numpy as np

        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        y /= height
        x /= width
        bases = []
        for _ in range(pool_size):
            image = np.empty((height, width, 3), np.float32)
            for channel in range(3):
                slope_x, slope_y, freq_x, freq_y = rng.uniform(-0.4, 0.4, 4)
                phase = rng.uniform(0, 2 * np.pi)
                wave = np.sin(2 * np.pi * 3 * (freq_x * x + freq_y * y) + phase)
                image[..., channel] = 0.5 + slope_x * x + slope_y * y + 0.15 * wave
            for _ in range(6):
                cy, cx, radius = (
                    rng.uniform(0.1, 0.9),
                    rng.uniform(0.1, 0.9),
                    rng.uniform(0.05, 0.2),
                )
                if rng.random() < 0.5:
                    mask = (x - cx) ** 2 + (y - cy) ** 2 < radius**2
                else:
                    mask = (abs(x - cx) < radius) & (abs(y - cy) < radius / 2)
                color = rng.uniform(0, 1, 3).astype(np.float32)
                image[mask] = image[mask] * 0.4 + color * 0.6
            # Margins so that gain <= 1 and noise within +-0.05 stay inside [0, 1].
            bases.append(np.clip(image, 0.06, 0.94))
        # Mild noise (std 0.02, about 5 levels) is what makes PNGs about 2 MB at 1024^2.
        pad = 64
        noise = rng.normal(0, 0.02, (height + pad, width + pad, 3)).astype(np.float32)
        return bases, np.clip(noise, -0.05, 0.05)

    class SimulatedGPUGenerator(GenerateImages):
        def load_model(self, spec):
            # No model: GenerateImages.__init__ takes whatever this returns as its pipeline.
            self.simulated_pool = synthetic_pool(spec.generation.width, spec.generation.height)
            return None

        def run_pipeline(self, prompts, negative_prompts, seeds, **pipeline_kwargs):
            import os

            import numpy as np

            from koala_batch.stages.generate import GeneratedImages, to_uint8

            started = time.time()
            time.sleep(seconds_per_batch)
            ended = time.time()
            bases, noise = self.simulated_pool
            height, width = bases[0].shape[:2]
            pad = noise.shape[0] - height
            images = np.empty((len(seeds), height, width, 3), np.float32)
            for position, seed in enumerate(seeds):
                rng = np.random.default_rng(seed)
                gain = rng.uniform(0.9, 1.0, 3).astype(np.float32)
                oy, ox = rng.integers(0, pad, 2)
                np.multiply(bases[seed % len(bases)], gain, out=images[position])
                images[position] += noise[oy : oy + height, ox : ox + width]
            record = {"start": started, "end": ended, "images": len(seeds)}
            with open(os.path.join(calls_path, f"{os.getpid()}.log"), "a") as handle:
                handle.write(json.dumps(record) + "\n")
            # A GPU generator hands over uint8 pixels (converted on the device).
            return GeneratedImages(pixels=to_uint8(images), finite=np.ones(len(seeds), bool))

        def truncated_prompts(self, prompts):
            return [False] * len(prompts)  # no tokenizer without a pipeline

    return SimulatedGPUGenerator


def busy_fraction(calls_dir: Path, actors: int, job_started: float, job_ended: float) -> dict:
    """GPU busy fraction and timeline from the sleeps the actors logged."""
    calls: dict[str, list[dict[str, float]]] = {}
    for log in sorted(calls_dir.glob("*.log")):
        calls[log.stem] = [json.loads(line) for line in log.read_text().splitlines() if line]
    every = [call for per_actor in calls.values() for call in per_actor]
    if not every:
        return {"busy_fraction": None, "pipeline_calls": 0, "actor_processes": 0}
    first = min(call["start"] for call in every)
    last = max(call["end"] for call in every)
    sleeping = sum(call["end"] - call["start"] for call in every)
    per_actor = [
        sum(c["end"] - c["start"] for c in cs) / (max(c["end"] for c in cs) - cs[0]["start"])
        for cs in calls.values()
    ]
    return {
        "busy_fraction": sleeping / (actors * (last - first)) if last > first else None,
        "busy_fraction_per_actor": per_actor,
        "pipeline_calls": len(every),
        "actor_processes": len(calls),
        "gpu_seconds": sleeping,
        "startup_s": first - job_started,  # job start to the first simulated GPU call
        "generating_s": last - first,
        "tail_s": job_ended - last,  # last GPU call to the job's return
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.simulated_gpu",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--size", type=int, default=1024, help="image side (default: 1024)")
    parser.add_argument(
        "--batch", type=int, default=4, help="compute.batch_size, images per GPU call (default: 4)"
    )
    parser.add_argument("--images", type=int, default=200, help="images per job (default: 200)")
    parser.add_argument(
        "--gpu-seconds",
        type=float,
        default=1.0,
        help="simulated GPU time per batch, in seconds (default: 1.0)",
    )
    parser.add_argument(
        "--format",
        default="png,jpeg,webp",
        help="output.image_format(s), one job each (default: png,jpeg,webp)",
    )
    parser.add_argument("--quality", type=int, default=95, help="output.quality (default: 95)")
    common.add_compute_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="koala-batch's info logs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.start_run(args.verbose)
    formats = [part.strip() for part in args.format.split(",") if part.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise SystemExit(f"--format: expected some of {', '.join(FORMATS)} (got {args.format!r})")
    import koala_batch

    # Steps and guidance are recorded in the manifest but decide nothing here.
    sampler = common.Sampler(
        steps=1, guidance_scale=1.0, width=args.size, height=args.size, negative_prompt=None
    )
    # No GPU is used: without 0, "auto" would tie each actor to a GPU on a GPU machine.
    compute = common.compute_section(args, num_gpus_per_actor=0, torch_threads=1)
    storage_kind = "moto S3 on 127.0.0.1" if args.s3 else "local files"
    prompts = common.prompt_table(args.images)
    ideal_images_per_s = args.actors * args.batch / args.gpu_seconds
    rows = []
    specs = {}
    with (
        common.job_storage(prompts, s3=args.s3, keep=args.keep) as storage,
        tempfile.TemporaryDirectory(prefix="koala-bench-calls-") as calls_root,
    ):
        for image_format in formats:
            calls_dir = Path(calls_root) / image_format
            calls_dir.mkdir()
            spec = common.job_spec(
                storage,
                f"simulated-{image_format}",
                "simulated-gpu",
                sampler,
                compute,
                {
                    "image_format": image_format,
                    "quality": args.quality,
                    "rows_per_shard": args.rows_per_shard,
                },
            )
            specs[image_format] = common.masked_spec(spec)
            generator = simulated_generator(args.gpu_seconds, calls_dir)
            started = time.time()
            record = koala_batch.run(spec, koala_batch.Substitutes(generator_cls=generator))
            ended = time.time()
            wall_s = ended - started
            counts = record["counts"]
            images = counts["images_written_this_run"]
            image_bytes = sum(shard["image_bytes"] for shard in record["shards"])
            timeline = busy_fraction(calls_dir, args.actors, started, ended)
            rows.append(
                {
                    "format": image_format,
                    "images": images,
                    "wall_s": wall_s,
                    **common.rate(images, wall_s),
                    "ideal_images_per_s": ideal_images_per_s,
                    **timeline,
                    "mb_per_image": image_bytes / max(1, counts["images_ok"]) / 1e6,
                    "images_ok": counts["images_ok"],
                    "images_failed": counts["images_failed"],
                    "counts": counts,
                    "record_wall_time_s": record["wall_time_s"],
                    "record_timeline": record.get("timeline"),
                }
            )

    ray_cpus = common.local_ray_cpus(args.local_cpus)
    settings = {
        "size": args.size,
        "batch_size": args.batch,
        "images": args.images,
        "gpu_seconds_per_batch": args.gpu_seconds,
        "formats": formats,
        "quality": args.quality,
        "actors": args.actors,
        "cpus_per_actor": args.cpus_per_actor,
        "ray_local_num_cpus": ray_cpus,
        "rows_per_shard": args.rows_per_shard,
        "storage": storage_kind,
        "specs": specs,
    }
    columns = [
        "format",
        "images",
        "wall_s",
        "s_per_image",
        "images_per_s",
        "ideal_images_per_s",
        "busy_fraction",
        "startup_s",
        "tail_s",
        "pipeline_calls",
        "mb_per_image",
        "images_ok",
        "images_failed",
    ]
    title = (
        f"{NAME}: {args.size}x{args.size}, batch {args.batch}, {args.gpu_seconds} s per batch, "
        f"{args.actors} actors, Ray local_num_cpus {ray_cpus}, {storage_kind}, "
        f"{common.device_name()}"
    )
    common.print_table(rows, columns, title)
    print(
        "busy_fraction = simulated GPU seconds / (actors x (last GPU call end - first start)); "
        "ideal_images_per_s = actors x batch / gpu-seconds"
    )
    for row in rows:
        print(f"{row['format']} timeline: {row['record_timeline']}")
    print(f"wrote {common.write_result(NAME, settings, {'formats': rows})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
