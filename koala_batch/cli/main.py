"""Command line: a thin layer over koala_batch.run and friends.

Exit codes: 0 success, 1 the job or check failed, 2 invalid spec or input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys

import yaml

from koala_batch.errors import EXIT_FAILED, EXIT_OK, KoalaBatchError


def _add_spec_arguments(parser: argparse.ArgumentParser, spec_env: bool = False) -> None:
    if spec_env:
        parser.add_argument("spec", nargs="?", help="job spec YAML file (or --spec-env)")
        parser.add_argument(
            "--spec-env",
            metavar="NAME",
            help="read the spec YAML from this environment variable instead of a file; what "
            "`submit` uses",
        )
    else:
        parser.add_argument("spec", help="job spec YAML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec field, e.g. --set compute.batch_size=8 (repeatable)",
    )


def _add_log_format_argument(parser: argparse.ArgumentParser, default: str) -> None:
    from koala_batch.runtime.console import LOG_FORMATS

    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=default,
        help="log lines on stderr: text (with a live progress line on a terminal), json (one "
        "JSON object per line, for schedulers and log collectors), or auto: text on a "
        "terminal, json otherwise (default)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="koala-batch",
        description="Generate image datasets from Parquet prompt tables with KOALA models on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _add_log_format_argument(parser, default="auto")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a job (resumes an earlier run on the same output)")
    _add_spec_arguments(run, spec_env=True)
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="delete koala-batch's own files under the output first, instead of resuming",
    )
    run.add_argument(
        "--retry-failed",
        action="store_true",
        help="also generate again the images recorded as errors (status=error) and replace "
        "their rows; with nothing failed, a plain resume",
    )

    submit = commands.add_parser(
        "submit",
        help="send a job to a Ray cluster through its Job Submission API and print its "
        "submission id: the spec travels in the submission, its relative local paths made "
        "absolute here first; a spec holding storage credentials is refused",
    )
    _add_spec_arguments(submit)
    submit.add_argument(
        "--address",
        required=True,
        metavar="URL",
        help="the Ray dashboard of the cluster's head, e.g. http://HEAD:8265",
    )
    submit.add_argument(
        "--follow",
        action="store_true",
        help="stream the job's logs and exit with its status (0, 1 or 2, as `run`); Ctrl-C "
        "stops following and leaves the job running",
    )
    submit.add_argument("--submission-id", metavar="ID", help="the job's submission id")
    submit.add_argument(
        "--overwrite", action="store_true", help="as for run: sets output.overwrite=true"
    )
    submit.add_argument("--retry-failed", action="store_true", help="as for run")

    validate = commands.add_parser(
        "validate",
        help="check a spec, its input (schema, row count) and that the output can be "
        "written; generates nothing",
    )
    _add_spec_arguments(validate)

    verify = commands.add_parser(
        "verify", help="check a job's output: images, checksums, sizes, unique keys, coverage"
    )
    verify.add_argument("output", help="output prefix (local path or URL)")
    verify.add_argument("--spec", help="job spec: also check that every input row is covered")
    verify.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of --spec (repeatable)",
    )

    inspect = commands.add_parser(
        "inspect",
        help="summarize an output (images, failures by reason, throughput) and write a "
        "contact sheet and a throughput plot",
    )
    inspect.add_argument("output", help="output prefix (local path or URL)")
    inspect.add_argument(
        "--out",
        metavar="DIR",
        help="folder for contact_sheet.png and throughput.png (default: a new "
        "inspect-<output>-<time> folder here); files there are never overwritten",
    )
    inspect.add_argument(
        "--samples", type=int, default=16, metavar="N", help="images on the contact sheet"
    )
    inspect.add_argument("--seed", type=int, default=0, help="which images are sampled")
    inspect.add_argument(
        "--tile", type=int, default=192, metavar="PX", help="contact-sheet image size in pixels"
    )
    fetch = commands.add_parser(
        "fetch-model",
        help="copy a model's safetensors weights, configs and tokenizers to a folder or an "
        "object-storage prefix, with a manifest of sizes and sha256, for model.name: DEST",
    )
    fetch.add_argument("name", help="preset, Hugging Face id or local diffusers directory")
    fetch.add_argument(
        "dest",
        help="local folder or fsspec URL (s3://bucket/models/koala-700m/); credentials "
        "from the environment (AWS_*, FSSPEC_S3_ENDPOINT_URL, ...)",
    )
    fetch.add_argument("--revision", help="Hub revision (branch, tag or commit) to copy")
    fetch.add_argument("--variant", help="weights variant to copy, e.g. fp16 (default: plain)")
    # Also after the command (`koala-batch run spec.yaml --log-format json`).
    for command in commands.choices.values():
        _add_log_format_argument(command, default=argparse.SUPPRESS)
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "overwrite", False):
        overrides.append("output.overwrite=true")
    return overrides


def _load(args: argparse.Namespace):
    from koala_batch.spec import load_spec

    if getattr(args, "spec_env", None):
        from koala_batch.cli.submit import spec_from_env

        return spec_from_env(args.spec_env, _overrides(args))
    return load_spec(args.spec, _overrides(args))


def command_validate(args: argparse.Namespace) -> int:
    from koala_batch.inputs.files import plan_input
    from koala_batch.models.preflight import check_model
    from koala_batch.output.commit import check_output
    from koala_batch.output.layout import JOB_FILE
    from koala_batch.output.lease import current_holder
    from koala_batch.spec import reveal_storage_options
    from koala_batch.storage import Storage

    spec = _load(args)
    plan = plan_input(
        spec.input, output_uri=spec.output.uri, images_per_prompt=spec.generation.images_per_prompt
    )
    model_source = check_model(spec.model)
    storage = Storage(spec.output.uri, reveal_storage_options(spec.output.storage_options))
    state = check_output(storage, spec, spec.output.overwrite)
    storage.check_writable(JOB_FILE)  # the first file a run writes
    print("# resolved spec (secrets masked)")
    print(yaml.safe_dump(spec.snapshot(), sort_keys=False).rstrip())
    print(f"# model: {spec.model.name}, from {model_source}")
    print(f"# steps: {spec.resolved_steps}, guidance_scale: {spec.resolved_guidance_scale}")
    print(
        f"# input: {len(plan.files)} file(s), {plan.num_rows} row(s), "
        f"{plan.planned_images} image(s) planned"
    )
    for input_file in plan.files:
        print(
            f"#   {input_file.url}: {input_file.num_rows} rows, "
            f"{len(input_file.row_group_rows)} row group(s)"
        )
    print("# input schema (first file)")
    for field in plan.files[0].schema:
        print(f"#   {field.name}: {field.type}")
    listing = state.listing
    print(
        f"# output {storage.url('')}: "
        + {
            "new": "new (nothing there yet)",
            "resume": f"resumes an earlier run of this spec ({len(listing.committed)} shard(s) "
            "committed)",
            "overwrite": f"will be overwritten ({len(listing.own_files)} koala-batch file(s) "
            "deleted)",
        }[state.action]
    )
    holder = current_holder(storage)
    if holder is not None:
        print(
            f"# output lease: held by {holder.describe()}; a run now exits busy while that "
            "run is alive, and takes the output over if it died"
        )
    return EXIT_OK


def cut_short(signum: int) -> None:
    """A stop's deadline passed (`job.STOP_DEADLINE_S` after the first signal) with the run
    still stopping: kill the local Ray cluster, say so in one line and end the process
    now. Nothing committed is lost: each commit is one atomic write."""
    from koala_batch.compat import kill_local_ray
    from koala_batch.runtime.console import write_last_line
    from koala_batch.runtime.signals import STOP_DEADLINE_S

    kill_local_ray()
    write_last_line(
        f"koala-batch: interrupted: stopped by {signal.Signals(signum).name}, cut short after "
        f"{STOP_DEADLINE_S:g} s; every committed shard is kept: rerun the same command to "
        "resume",
        128 + signum,
    )
    os._exit(128 + signum)


def command_run(args: argparse.Namespace) -> int:
    from koala_batch.errors import Interrupted
    from koala_batch.runtime.job import run
    from koala_batch.runtime.signals import stop_on_signals

    # From the first line on, so that a signal before or after the Ray part (planning the
    # input, writing _SUCCESS) also ends in one line and 130/143; and in time.
    with stop_on_signals(cut_short) as stop:
        try:
            record = run(_load(args), retry_failed=args.retry_failed)
        except KeyboardInterrupt:
            signum = stop.received or signal.SIGINT
            raise Interrupted(
                signum,
                f"stopped by {signal.Signals(signum).name}; every committed shard is kept: "
                "rerun the same command to resume",
            ) from None
    counts = record["counts"]
    print(
        json.dumps(
            {
                "output": record["spec"]["output"]["uri"],
                **counts,
                "wall_time_s": record["wall_time_s"],
                "images_per_s": record["images_per_s"],
            },
            indent=2,
        )
    )
    return EXIT_OK


def command_submit(args: argparse.Namespace) -> int:
    from koala_batch.cli.submit import submit

    return submit(
        args.spec,
        _overrides(args),
        args.address,
        retry_failed=args.retry_failed,
        submission_id=args.submission_id,
        follow_logs=args.follow,
    )


def command_verify(args: argparse.Namespace) -> int:
    from koala_batch.errors import UsageError
    from koala_batch.output.verify import verify_output
    from koala_batch.spec import load_spec, reveal_storage_options

    if args.overrides and not args.spec:
        # Without a spec there is nothing to override: ignoring them would verify less
        # than the user asked for.
        raise UsageError(
            "--set needs --spec: give the job spec the overrides apply to, or drop --set"
        )
    spec = load_spec(args.spec, args.overrides) if args.spec else None
    options = reveal_storage_options(spec.output.storage_options) if spec else None
    report = verify_output(args.output, options, spec=spec)
    print(report.format())
    return EXIT_OK if report.ok else EXIT_FAILED


def command_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from koala_batch.cli.inspect import inspect_output

    result = inspect_output(
        args.output,
        Path(args.out) if args.out else None,
        samples=args.samples,
        seed=args.seed,
        tile=args.tile,
    )
    print(result.table)
    print(f"contact sheet: {result.contact_sheet}")
    print(f"throughput:    {result.throughput}")
    return EXIT_OK


def command_fetch_model(args: argparse.Namespace) -> int:
    from koala_batch.models.weights import fetch_model
    from koala_batch.presets import PRESETS, TINY_MODEL_NAME

    result = fetch_model(args.name, args.dest, revision=args.revision, variant=args.variant)
    use = f"model.name: {result.url}"
    if args.name in PRESETS and args.name != TINY_MODEL_NAME:
        use += f" and model.preset: {args.name}"
    print(
        f"fetched {args.name}: {result.files} files, {result.total_size / 1e6:.1f} MB "
        f"({result.copied} copied, {result.files - result.copied} already there) "
        f"to {result.url}; use it with {use}"
    )
    return EXIT_OK


# Their debug logs carry request headers (access key ids, signatures): never below WARNING.
CHATTY_LIBRARIES = ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "boto3", "filelock")


def configure_logging(verbose: bool, log_format: str = "text") -> None:
    """INFO for everything; DEBUG for koala-batch alone with -v; storage clients quiet.
    Records go to stderr as text or JSON lines (see koala_batch.runtime.console)."""
    from koala_batch.runtime.console import configure_console

    configure_console(log_format)
    logging.getLogger("koala_batch").setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failed, 2 invalid)."""
    from koala_batch.runtime.console import print_failure

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run" and (args.spec is None) == (args.spec_env is None):
        parser.error("run: give either a spec file or --spec-env NAME (one of the two)")
    configure_logging(args.verbose, args.log_format)
    handlers = {
        "run": command_run,
        "submit": command_submit,
        "validate": command_validate,
        "verify": command_verify,
        "inspect": command_inspect,
        "fetch-model": command_fetch_model,
    }
    try:
        return handlers[args.command](args)
    except KoalaBatchError as exc:
        print_failure(
            f"koala-batch: {exc.headline or args.command + ' failed'}: {exc}", exc.exit_code
        )
        return exc.exit_code
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
        print_failure(f"koala-batch: interrupted: {args.command} stopped by SIGINT", code)
        return code
    except Exception as exc:
        if args.verbose:
            raise
        print_failure(
            f"koala-batch: {args.command} failed: {type(exc).__name__}: {exc} "
            "(run with -v for the traceback)",
            EXIT_FAILED,
        )
        return EXIT_FAILED


# What leaving a Ray cluster may take at the command's end before the process exits anyway.
LEAVE_RAY_S = 10.0


def entry() -> None:
    """The `koala-batch` command: `main`, then exit with its code at once.

    Interpreter teardown runs the native libraries' static destructors (Arrow's thread
    pools, Ray's), and a thread of theirs still running can abort the finished process:
    "terminate called without an active exception", exit -6 instead of the command's
    code (seen once in CI, under load). Everything the command does is done by then: the
    Ray session it joined is left, logs and streams are flushed, then the process exits.
    """
    code = main()
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():  # a cluster the command joined: leave it, in time
            from koala_batch.runtime.session import shutdown_ray_within

            shutdown_ray_within(LEAVE_RAY_S)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing left to say
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
