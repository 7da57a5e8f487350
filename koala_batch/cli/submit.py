"""`koala-batch submit`: a job spec sent to a Ray cluster through its Job Submission API.

The spec travels as YAML in the submission's runtime_env (`KOALA_BATCH_SPEC`) and the
driver on the cluster is `koala-batch run --spec-env KOALA_BATCH_SPEC`. Everything in a
submission is shown by the Ray dashboard to anyone who can reach it, so a spec holding
storage credentials is refused, and nothing of the local environment travels with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml
from pydantic import SecretStr

from koala_batch.compat import RAY_NO_JOB_AGENT
from koala_batch.errors import (
    EXIT_INVALID,
    EXIT_OK,
    DashboardError,
    Interrupted,
    JobFailedError,
    SecretInSubmissionError,
    SpecError,
    UsageError,
)
from koala_batch.spec import JobSpec, apply_overrides, load_spec, spec_from_dict

SPEC_ENV = "KOALA_BATCH_SPEC"
# The sections whose storage_options reach a filesystem (and so may hold credentials).
STORAGE_SECTIONS = ("input", "model", "output")
# Ray's client takes these over the address it is given: --address must win.
RAY_ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
PROBE_TIMEOUT_S = 10.0
# How long a submission waits for a cluster whose job agent is not ready yet, and between
# tries: a head just started on a busy node takes tens of seconds to get one.
AGENT_WAIT_S = 120.0
AGENT_RETRY_S = 2.0

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# The spec that is sent


def spec_from_env(name: str, overrides: list[str] | None = None) -> JobSpec:
    """The spec in environment variable `name` (YAML, as `submit` sends it), overrides applied."""
    text = os.environ.get(name)
    source = f"${name}"
    if text is None:
        raise SpecError(
            f"environment variable {name} is not set; --spec-env names the variable holding "
            "the spec's YAML (koala-batch submit sets it), or pass a spec file instead"
        )
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise SpecError(f"job spec {source} is not valid YAML: {detail}") from None
    if not isinstance(raw, dict):
        return spec_from_dict(raw, source=source)  # says what a spec looks like
    return spec_from_dict(apply_overrides(raw, overrides or []), source=source)


def secret_fields(spec: JobSpec) -> list[str]:
    """The dotted path of every credential in the spec's storage options."""

    def walk(options: dict[str, Any], prefix: str) -> Iterator[str]:
        for name, value in options.items():
            if isinstance(value, SecretStr):
                yield f"{prefix}.{name}"
            elif isinstance(value, dict):
                yield from walk(value, f"{prefix}.{name}")

    found: list[str] = []
    for section in STORAGE_SECTIONS:
        found.extend(walk(getattr(spec, section).storage_options, f"{section}.storage_options"))
    return found


def refuse_secrets(spec: JobSpec) -> None:
    """SecretInSubmissionError naming every credential field, if the spec holds any."""
    fields = secret_fields(spec)
    if fields:
        raise SecretInSubmissionError(
            f"the spec holds storage credentials ({', '.join(fields)}), and the Ray dashboard "
            "shows a submission to anyone who can reach it: nothing was submitted. Remove them "
            "and give the credentials to the cluster instead: its own environment (AWS_* "
            "variables, or an instance or pod role, on the Ray nodes) or a Kubernetes secret "
            "mounted as environment variables (see infra/kuberay/)"
        )


def _is_url(value: str) -> bool:
    return "://" in value


def _absolute(path: str, cwd: Path) -> str:
    """`path` as the local filesystem would read it from `cwd`."""
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded):
        return expanded
    joined = os.path.join(cwd, expanded)
    # normpath drops `./` and doubled slashes; `..` is left to the filesystem, which
    # resolves it after any symbolic link, as a local run would.
    return joined if ".." in Path(expanded).parts else os.path.normpath(joined)


def _local_path(value: str, cwd: Path) -> str:
    return value if _is_url(value) else _absolute(value, cwd)


def resolve_local_paths(raw: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """A copy of a valid raw spec whose relative local paths are absolute under `cwd`:
    input.uri, output.uri, and model.name where it names a local directory (a preset or a
    Hugging Face id is not a path). The driver on the cluster runs elsewhere."""
    from koala_batch.presets import PRESETS, TINY_MODEL_NAME

    resolved = {section: dict(value) for section, value in raw.items()}
    uri = resolved["input"]["uri"]
    resolved["input"]["uri"] = (
        _local_path(uri, cwd) if isinstance(uri, str) else [_local_path(u, cwd) for u in uri]
    )
    resolved["output"]["uri"] = _local_path(resolved["output"]["uri"], cwd)
    model = resolved.get("model")
    name = model.get("name") if isinstance(model, dict) else None
    if (
        isinstance(model, dict)
        and isinstance(name, str)
        # A run loads these as what they name, whatever folder shares their name.
        and name != TINY_MODEL_NAME
        and name not in PRESETS
        and not _is_url(name)
        and not os.path.isabs(os.path.expanduser(name))
        and Path(_absolute(name, cwd)).is_dir()
    ):
        model["name"] = _absolute(name, cwd)
        implied = next((key for key, p in PRESETS.items() if p.source == name), None)
        if implied is not None and model.get("preset") is None:
            # A preset's Hugging Face id implied its sampler settings; a path does not.
            model["preset"] = implied
    return resolved


def submission_spec(
    spec_path: str | Path, overrides: list[str], cwd: Path | None = None
) -> dict[str, Any]:
    """The raw spec `submit` sends: loaded and validated as `run` would, credentials refused,
    overrides applied and relative local paths made absolute under `cwd` (default: here).
    Unset fields stay unset, so the cluster's koala-batch applies its own defaults."""
    cwd = cwd or Path.cwd()
    spec = load_spec(spec_path, overrides)  # every SpecError exactly as `run` gives it
    refuse_secrets(spec)
    raw = apply_overrides(yaml.safe_load(Path(spec_path).read_text()) or {}, overrides)
    resolved = resolve_local_paths(raw, cwd)
    spec_from_dict(resolved, source=f"{spec_path} (paths resolved under {cwd})")
    return resolved


@dataclass(frozen=True)
class Submission:
    """What is sent: the driver's command line and its runtime_env (the spec, nothing else)."""

    entrypoint: str
    runtime_env: dict[str, Any]


def build_submission(raw: dict[str, Any], retry_failed: bool = False) -> Submission:
    """The entrypoint and runtime_env for a raw spec; the local environment stays here."""
    command = f"koala-batch --log-format text run --spec-env {SPEC_ENV}"
    if retry_failed:
        command += " --retry-failed"
    text = yaml.safe_dump(raw, sort_keys=False)
    return Submission(entrypoint=command, runtime_env={"env_vars": {SPEC_ENV: text}})


# ---------------------------------------------------------------------------------------
# The cluster


@contextlib.contextmanager
def _without_address_variables() -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in RAY_ADDRESS_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _check_address(address: str) -> str:
    if not address.startswith(("http://", "https://")):
        raise UsageError(
            f"--address {address}: the URL of the Ray dashboard is needed, e.g. "
            "--address http://HEAD:8265 (not the GCS address HEAD:6379)"
        )
    return address.rstrip("/")


def _unreachable(address: str, reason: str) -> DashboardError:
    return DashboardError(
        f"cannot reach the Ray dashboard at {address} ({reason}); pass --address "
        "http://HEAD:8265 of a head running the dashboard"
    )


def connect(address: str) -> Any:
    """A JobSubmissionClient for the dashboard at `address`; DashboardError in one line."""
    import requests

    try:
        # Ray's client waits for the OS's connect timeout (minutes) on an address that
        # never answers: a bounded probe first. Any HTTP answer will do here.
        requests.get(f"{address}/api/version", timeout=PROBE_TIMEOUT_S)
    except requests.RequestException as exc:
        raise _unreachable(address, type(exc).__name__) from None

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        with _without_address_variables():
            return JobSubmissionClient(address)
    except AuthenticationError as exc:
        refused = "Authentication failed" in str(exc)  # Ray's words for HTTP 403
        raise DashboardError(
            f"the Ray dashboard at {address} "
            + (
                "refused the token (HTTP 403): set RAY_AUTH_TOKEN to the cluster's token"
                if refused
                else "asks for a token (HTTP 401): set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                "to the cluster's token (or RAY_AUTH_TOKEN_PATH to a file holding it)"
            )
        ) from None
    except ConnectionError as exc:
        raise _unreachable(address, " ".join(str(exc).split())) from None
    except RuntimeError as exc:
        raise DashboardError(
            f"{address} did not answer as a Ray dashboard ({' '.join(str(exc).split())}); "
            "pass --address http://HEAD:8265 of a head running the dashboard"
        ) from None


def _quiet_ray_client() -> None:
    # "WebSocket closed for job ..." at INFO after every followed job: nothing to act on.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _commands(job_id: str, address: str) -> str:
    return (
        f"follow it with `ray job logs {job_id} --address {address} --follow`, stop it with "
        f"`ray job stop {job_id} --address {address}`"
    )


@contextlib.contextmanager
def _leave_running_on_interrupt(job_id: str, address: str) -> Iterator[None]:
    """Ctrl-C stops the following, not the job: Interrupted (exit 130) saying so."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(
            signal.SIGINT,
            f"stopped following job {job_id}, which goes on running on the cluster: "
            + _commands(job_id, address),
        ) from None


def follow(client: Any, job_id: str, address: str, stream: TextIO | None = None) -> int:
    """Copy the job's logs to `stream` as they come, then its exit code as `run` gives it:
    0 succeeded; else a KoalaBatchError whose exit code is the driver's (1 or 2)."""
    from ray.job_submission import JobStatus

    out = stream or sys.stdout

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    with _leave_running_on_interrupt(job_id, address):
        try:
            asyncio.run(tail())
        except RuntimeError as exc:
            # The stream broke (a dashboard restart): the job itself may go on.
            raise DashboardError(
                f"lost the log stream of job {job_id} ({' '.join(str(exc).split())}); it may "
                f"still be running: {_commands(job_id, address)}"
            ) from None
        info = client.get_job_info(job_id)
        while not info.status.is_terminal():  # the stream may end a moment before
            time.sleep(0.5)
            info = client.get_job_info(job_id)
    if info.status == JobStatus.SUCCEEDED:
        return EXIT_OK
    if info.status == JobStatus.STOPPED:
        raise JobFailedError(
            f"job {job_id} was stopped before it finished; every committed shard is kept: "
            "submit the same spec again to resume"
        )
    code = info.driver_exit_code
    if code == EXIT_INVALID:
        raise UsageError(
            f"job {job_id} ended with exit code 2 on the cluster: the spec, input, output or "
            "model cannot be used there (the job's last line above says which); fix it and "
            "submit again"
        )
    detail = (
        f"exit code {code}"
        if code is not None
        else " ".join((info.message or str(info.error_type)).split())[:300]
    )
    raise JobFailedError(
        f"job {job_id} failed on the cluster ({detail}; its logs above say why); every "
        "committed shard is kept: submit the same spec again to resume"
    )


def when_agent_ready(
    call: Callable[[], str],
    wait_s: float = AGENT_WAIT_S,
    retry_s: float = AGENT_RETRY_S,
) -> str:
    """`call()`, tried again while the cluster answers that no job agent is ready, for up
    to `wait_s`; then, or on any other refusal, its RuntimeError. No job exists after such
    an answer (the head had no agent to hand it to), so trying again cannot make two."""
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            return call()
        except RuntimeError as exc:
            if RAY_NO_JOB_AGENT not in str(exc) or time.monotonic() + retry_s > deadline:
                raise
            if not said:
                logger.info("the cluster's job agent is not ready yet; trying again")
                said = True
            time.sleep(retry_s)


def submit(
    spec_path: str,
    overrides: list[str],
    address: str,
    *,
    retry_failed: bool = False,
    submission_id: str | None = None,
    follow_logs: bool = False,
) -> int:
    """`koala-batch submit`: send the spec, print the submission id; with `follow_logs`,
    stream the job's logs and return its exit code."""
    address = _check_address(address)
    submission = build_submission(submission_spec(spec_path, overrides), retry_failed)
    client = connect(address)
    _quiet_ray_client()
    try:
        job_id = when_agent_ready(
            lambda: client.submit_job(
                entrypoint=submission.entrypoint,
                runtime_env=submission.runtime_env,
                submission_id=submission_id,
            )
        )
    except RuntimeError as exc:  # Ray's client: the dashboard's answer, e.g. an id in use
        raise DashboardError(
            f"the Ray dashboard at {address} refused the job: {' '.join(str(exc).split())}"
        ) from None
    if not follow_logs:
        print(f"submitted {job_id} to {address}; {_commands(job_id, address)}", flush=True)
        return EXIT_OK
    with _leave_running_on_interrupt(job_id, address):
        print(f"submitted {job_id} to {address}; following its logs (Ctrl-C leaves it running)")
        sys.stdout.flush()
        return follow(client, job_id, address)
