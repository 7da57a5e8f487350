"""Data-plane benchmark: driver peak memory and rows/s of whole jobs as the row count grows.

Each row count runs as one whole job (koala_batch.run, Parquet to committed shards, local
files) in a fresh Python process, so each driver's peak RSS (getrusage ru_maxrss of that
process alone; Ray's workers and daemons are other processes) is its own. By default the
generator is the simulated one with no delay at 64x64 (no model, synthetic images), so
what is measured is the data plane alone: reading, expanding, rebundling, the actor
hand-offs, encoding, writing and committing. `--generator tiny` runs the tiny model
instead. The target: driver peak RSS at the largest row count within 1.5x of that at
the smallest.

    python -m bench.data_plane --rows 10000,100000 --size 64 --batch 16 --actors 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import common

NAME = "data_plane"
GENERATORS = ("simulated", "tiny")
# The target: driver peak memory at the largest row count within 1.5x of the smallest.
PEAK_RSS_RATIO_TARGET = 1.5
# The child's driver RSS is sampled this often, to show whether it grows during the job.
RSS_SAMPLE_S = 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.data_plane",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--rows",
        type=common.parse_int_list,
        default=[10_000, 100_000],
        help="prompt-table row counts, one job each in its own process (default: 10000,100000)",
    )
    parser.add_argument(
        "--generator",
        choices=GENERATORS,
        default="simulated",
        help="simulated: no model, no delay, synthetic images (the data plane alone); "
        "tiny: the tiny model, 4 steps (default: simulated)",
    )
    parser.add_argument("--size", type=int, default=64, help="image side (default: 64)")
    parser.add_argument(
        "--batch", type=int, default=16, help="compute.batch_size, images per call (default: 16)"
    )
    parser.add_argument(
        "--gpu-seconds",
        type=float,
        default=0.0,
        help="simulated generator only: sleep per batch, in seconds (default: 0)",
    )
    parser.add_argument(
        "--format",
        choices=("png", "jpeg", "webp"),
        default="png",
        help="output.image_format (default: png)",
    )
    common.add_compute_arguments(parser)
    # Shards of the size, not the small default the other benchmarks share.
    parser.set_defaults(rows_per_shard=1000)
    parser.add_argument(
        "--threads-per-actor",
        type=int,
        default=1,
        help="compute.torch_threads of the tiny generator (default: 1)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="koala-batch's info logs")
    # The child mode: run one job from a spec file and write its measurements (internal).
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.s3:
        parser.error("--s3 is not supported: the data plane is measured on local files")
    return args


# ---------------------------------------------------------------------------------------
# The child: one job, one process


def rss_mb() -> float | None:
    """This process's resident set now, in MB (from /proc; None where there is none)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


class RssSampler:
    """Samples this process's RSS on a daemon thread while a job runs."""

    def __init__(self, interval_s: float = RSS_SAMPLE_S) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            current = rss_mb()
            if current is not None:
                self.samples.append((round(time.perf_counter() - self._started, 2), current))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def thinned(self, at_most: int = 100) -> list[tuple[float, float]]:
        """At most `at_most` samples, evenly spaced, the last one kept."""
        step = max(1, -(-len(self.samples) // at_most))
        kept = self.samples[::step]
        if self.samples and kept[-1] is not self.samples[-1]:
            kept.append(self.samples[-1])
        return [(t, round(mb, 1)) for t, mb in kept]


def run_child(job_file: Path) -> int:
    """Run the job of `job_file` ({"spec", "generator", "gpu_seconds", "calls_dir", "out"})
    in this process and write its measurements as JSON to the file named by "out"."""
    process_started = time.perf_counter()
    job = json.loads(job_file.read_text())
    import koala_batch

    overrides = koala_batch.Substitutes()
    if job["generator"] == "simulated":
        from bench.simulated_gpu import simulated_generator

        generator = simulated_generator(job["gpu_seconds"], Path(job["calls_dir"]))
        overrides = koala_batch.Substitutes(generator_cls=generator)
    # Imports and the interpreter itself are in every driver: measured apart from the job.
    before_job_mb = peak_rss_mb()
    with RssSampler() as sampler:
        started = time.perf_counter()
        record = koala_batch.run(job["spec"], overrides)
        run_s = time.perf_counter() - started
    result = {
        "run_s": run_s,
        "process_s": time.perf_counter() - process_started,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_before_job_mb": before_job_mb,
        "rss_end_mb": rss_mb(),
        "rss_samples": sampler.thinned(),
        "record_wall_time_s": record["wall_time_s"],
        "counts": record["counts"],
        "timeline": record.get("timeline") or {},
    }
    if job["generator"] == "simulated":
        from bench.simulated_gpu import busy_fraction

        calls = busy_fraction(Path(job["calls_dir"]), 1, 0.0, 0.0)
        result["pipeline_calls"] = calls["pipeline_calls"]
        result["actor_processes"] = calls["actor_processes"]
    Path(job["out"]).write_text(json.dumps(result, default=str))
    return 0


# ---------------------------------------------------------------------------------------
# The parent: prompts, specs, one child per row count, the table


def job_settings(args: argparse.Namespace) -> tuple[str, common.Sampler, dict[str, Any]]:
    """The model name, sampler and compute section of every job of this run."""
    if args.generator == "tiny":
        model = str(common.prepare_model("tiny"))
        # A model directory gets generic defaults, so the tiny preset's steps are explicit.
        sampler = common.resolve_sampler("tiny", args.size, None, None, "")
        compute = common.compute_section(args, torch_threads=args.threads_per_actor)
        return model, sampler, compute
    # Steps and guidance are recorded in the manifest but decide nothing here.
    sampler = common.Sampler(
        steps=1, guidance_scale=1.0, width=args.size, height=args.size, negative_prompt=None
    )
    # No GPU is used: without 0, "auto" would tie each actor to a GPU on a GPU machine.
    compute = common.compute_section(args, num_gpus_per_actor=0, torch_threads=1)
    return "simulated-gpu", sampler, compute


def run_rows(
    args: argparse.Namespace,
    rows: int,
    model: str,
    sampler: common.Sampler,
    compute: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One job over a `rows`-row prompt table in a fresh process: (its row, its masked spec)."""
    # Built here, not in the child: the prompt table's Python lists would count in the
    # child's peak and grow with the row count.
    prompts = common.prompt_table(rows)
    with (
        common.job_storage(
            prompts, s3=False, keep=args.keep / str(rows) if args.keep else None
        ) as storage,
        tempfile.TemporaryDirectory(prefix="koala-bench-plane-") as scratch,
    ):
        del prompts
        spec = common.job_spec(
            storage,
            f"rows-{rows}",
            model,
            sampler,
            compute,
            {"image_format": args.format, "rows_per_shard": args.rows_per_shard},
        )
        calls_dir = Path(scratch) / "calls"
        calls_dir.mkdir()
        out = Path(scratch) / "result.json"
        job_file = Path(scratch) / "job.json"
        job_file.write_text(
            json.dumps(
                {
                    "spec": spec,
                    "generator": args.generator,
                    "gpu_seconds": args.gpu_seconds,
                    "calls_dir": str(calls_dir),
                    "out": str(out),
                }
            )
        )
        command = [sys.executable, "-m", "bench.data_plane", "--child", str(job_file)]
        if args.verbose:
            command.append("--verbose")
        started = time.perf_counter()
        returncode = subprocess.run(command, cwd=common.REPO_ROOT).returncode
        wall_s = time.perf_counter() - started
        if returncode != 0:
            raise SystemExit(f"the {rows}-row job failed (exit {returncode}); see its output above")
        child = json.loads(out.read_text())

    timeline = child["timeline"]
    images = child["counts"]["images_written_this_run"]
    first_image, last_commit = timeline.get("first_image_s"), timeline.get("last_commit_s")
    # From the first image out of a generator to the last commit: the job's steady
    # stream, without Ray's start, the actors' start and the shutdown.
    exec_s = last_commit - first_image if first_image is not None and last_commit else None
    row = {
        "rows": rows,
        "images": images,
        "wall_s": wall_s,
        "run_s": child["run_s"],
        "exec_s": exec_s,
        "rows_per_s": common.ratio(rows, child["run_s"]),
        "exec_rows_per_s": common.ratio(images, exec_s),
        "peak_rss_mb": child["peak_rss_mb"],
        "rss_before_job_mb": child["peak_rss_before_job_mb"],
        "first_commit_s": timeline.get("first_commit_s"),
        "max_uncommitted": timeline.get("max_uncommitted_images"),
        "shards": timeline.get("shards_committed"),
        "images_ok": child["counts"]["images_ok"],
        "images_failed": child["counts"]["images_failed"],
        **{key: child[key] for key in ("pipeline_calls", "actor_processes") if key in child},
        "rss_end_mb": child["rss_end_mb"],
        "record_wall_time_s": child["record_wall_time_s"],
        "counts": child["counts"],
        "record_timeline": timeline,
        "rss_samples": child["rss_samples"],
    }
    return row, common.masked_spec(spec)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.start_run(args.verbose)
    if args.child is not None:
        return run_child(args.child)
    model, sampler, compute = job_settings(args)
    counts = sorted(set(args.rows))
    rows = []
    specs = {}
    for count in counts:
        print(f"running {count} rows in a fresh process ...", flush=True)
        row, specs[str(count)] = run_rows(args, count, model, sampler, compute)
        rows.append(row)

    smallest, largest = rows[0], rows[-1]
    rss_ratio = common.ratio(largest["peak_rss_mb"], smallest["peak_rss_mb"])
    passed = rss_ratio is not None and rss_ratio <= PEAK_RSS_RATIO_TARGET
    ray_cpus = common.local_ray_cpus(args.local_cpus)
    generator = (
        f"simulated, {args.gpu_seconds} s per batch" if args.generator == "simulated" else "tiny"
    )
    settings = {
        "rows": counts,
        "generator": args.generator,
        "gpu_seconds_per_batch": args.gpu_seconds if args.generator == "simulated" else None,
        "size": args.size,
        "batch_size": args.batch,
        "image_format": args.format,
        "actors": args.actors,
        "cpus_per_actor": args.cpus_per_actor,
        "ray_local_num_cpus": ray_cpus,
        "rows_per_shard": args.rows_per_shard,
        "storage": "local files",
        "specs": specs,
    }
    results = {
        "peak_rss_ratio": rss_ratio,
        "peak_rss_ratio_target": PEAK_RSS_RATIO_TARGET,
        "passed": passed if len(rows) > 1 else None,
        "row_counts": rows,
    }
    columns = [
        "rows",
        "wall_s",
        "run_s",
        "exec_s",
        "rows_per_s",
        "exec_rows_per_s",
        "peak_rss_mb",
        "rss_before_job_mb",
        "first_commit_s",
        "max_uncommitted",
        "shards",
        "images_failed",
    ]
    title = (
        f"{NAME}: {generator}, {args.size}x{args.size} {args.format}, batch {args.batch}, "
        f"{args.actors} actors, {args.rows_per_shard} rows per shard, "
        f"Ray local_num_cpus {ray_cpus}, local files, {common.device_name()}"
    )
    common.print_table(rows, columns, title)
    print(
        "wall_s: the child process (imports, job, exit); run_s: koala_batch.run; "
        "exec_s: first image to last commit; rows_per_s = rows / run_s; "
        "peak_rss_mb: the driver process's ru_maxrss (rss_before_job_mb: after its imports)"
    )
    if len(rows) > 1:
        verdict = "PASS" if passed else "FAIL"
        print(
            f"driver peak RSS {largest['rows']} rows / {smallest['rows']} rows = "
            f"{rss_ratio:.3f} (target <= {PEAK_RSS_RATIO_TARGET}): {verdict}"
        )
    else:
        print("peak RSS ratio: needs two row counts or more")
    print(f"wrote {common.write_result(NAME, settings, results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
