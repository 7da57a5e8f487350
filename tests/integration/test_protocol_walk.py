"""The whole commit protocol as a seeded random walk: input edits, runs with and without
output.accumulate, `--retry-failed`, SIGKILLs mid-run and resumes, each run's outcome
checked against an oracle that reads only the input and the manifests.

After a run that succeeds: the committed ids are the input's (or contain them, with
output.accumulate), each key once, each ok image made from the prompt its id has now
(all of them after `--retry-failed`), and `verify --spec` is clean (it checks every
image's sha256). After a refusal: exit 2 and the output byte for byte as it was. After a
SIGKILL: every key committed before is still committed.

CI walks a few steps. A soak walks longer: KOALA_WALK_SECONDS=1800 (and KOALA_WALK_SEED
to replay one walk). A failure prints the seed and the steps taken.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import koala_batch
from koala_batch.errors import KoalaBatchError
from koala_batch.output.verify import verify_output
from koala_batch.spec import spec_from_dict
from tests.conftest import REPO_ROOT, tiny_spec, write_prompt_table
from tests.integration.conftest import start_local_ray

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

CLI = str(Path(sys.executable).parent / "koala-batch")
# CI's walk: enough steps for a kill, a refusal and a retry on most seeds, in about two
# minutes here; on a slower machine it stops early (never fewer than MIN_STEPS), so that
# it stays within three.
CI_STEPS = 7
MIN_STEPS = 3
CI_SECONDS = 120.0
KILL_WAIT_S = 120


@dataclass
class Walk:
    """The walk's state: the input (id -> prompt; an empty prompt makes an error row)."""

    root: Path
    rng: random.Random
    rows: dict[str, str] = field(default_factory=dict)
    next_id: int = 0
    version: int = 0
    log: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def output(self) -> Path:
        return self.root / "out"

    def new_rows(self, count: int) -> None:
        for _ in range(count):
            self.rows[f"id-{self.next_id:04d}"] = self.prompt()
            self.next_id += 1

    def prompt(self) -> str:
        self.version += 1
        return "" if self.rng.random() < 0.15 else f"a paper boat, take {self.version}"

    def spec(self, accumulate: bool) -> dict:
        ids = sorted(self.rows)
        path = self.root / f"in-{len(self.log)}.parquet"
        write_prompt_table(path, [self.rows[i] for i in ids], id=ids)
        return tiny_spec(
            str(path),
            str(self.output),
            input={"id_column": "id"},
            generation={"width": 32, "height": 32, "steps": 1},
            compute={"batch_size": 2},
            output={"rows_per_shard": 3, "accumulate": accumulate, "max_failed_fraction": 1.0},
        )


def edit_input(walk: Walk) -> str:
    """One random edit of the input, described."""
    ids = sorted(walk.rows)
    edit = walk.rng.choice(["add", "remove", "replace", "replace all", "edit prompt"])
    if edit == "add" or not ids:
        walk.new_rows(walk.rng.randint(1, 4))
        return "add"
    if edit == "remove":
        for row_id in walk.rng.sample(ids, min(len(ids) - 1, walk.rng.randint(1, 3))):
            del walk.rows[row_id]
    elif edit == "replace":
        for row_id in walk.rng.sample(ids, min(len(ids), walk.rng.randint(1, 2))):
            del walk.rows[row_id]
        walk.new_rows(walk.rng.randint(1, 2))
    elif edit == "replace all":
        walk.rows.clear()
        walk.new_rows(walk.rng.randint(2, 6))
    else:
        for row_id in walk.rng.sample(ids, min(len(ids), walk.rng.randint(1, 2))):
            walk.rows[row_id] = walk.prompt()
    return edit


def committed(output: Path) -> dict[str, dict]:
    """id -> its committed manifest row (a key twice fails the walk)."""
    rows: dict[str, dict] = {}
    for path in sorted((output / "manifests").glob("*.parquet")):
        for row in pq.read_table(path, columns=["id", "key", "status", "prompt"]).to_pylist():
            assert row["id"] not in rows, f"id {row['id']} committed twice"
            rows[row["id"]] = row
    return rows


def snapshot(output: Path) -> dict[str, bytes]:
    if not output.exists():
        return {}
    return {str(p.relative_to(output)): p.read_bytes() for p in output.rglob("*") if p.is_file()}


def expected_refusal(walk: Walk, accumulate: bool, overwrite: bool) -> str | None:
    """Why the oracle says this run must be refused, from the manifests and the input."""
    if overwrite or not (walk.output / "_job.json").exists():
        return None
    rows = committed(walk.output)
    stale = sorted(set(rows) - set(walk.rows))
    if stale and not accumulate:
        return f"stale ids {stale[:3]}"
    changed = [
        row_id
        for row_id, row in rows.items()
        if row["status"] == "ok" and row_id in walk.rows and walk.rows[row_id] != row["prompt"]
    ]
    return f"changed ids {changed[:3]}" if changed else None


def run_in_process(spec: dict, retry: bool) -> int:
    try:
        koala_batch.run(spec, retry_failed=retry)
    except KoalaBatchError as exc:
        return exc.exit_code
    return 0


def run_and_kill(walk: Walk, spec: dict, retry: bool) -> None:
    """`koala-batch run` in a process group of its own, SIGKILLed once it has committed a
    shard of its own (or at a random moment before)."""
    spec_path = walk.root / "killed.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    manifests = walk.output / "manifests"
    before = set(manifests.glob("*.parquet")) if manifests.exists() else set()
    job = subprocess.Popen(
        [CLI, "--log-format", "json", "run", str(spec_path), *(["--retry-failed"] * retry)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    give_up = time.monotonic() + walk.rng.choice([4.0, KILL_WAIT_S])
    while time.monotonic() < give_up and job.poll() is None:
        if manifests.exists() and set(manifests.glob("*.parquet")) - before:
            break
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):  # it finished first
        os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=60)


def check_success(walk: Walk, spec: dict, accumulate: bool, retry: bool) -> None:
    rows = committed(walk.output)
    if accumulate:
        assert set(walk.rows) <= set(rows), sorted(set(walk.rows) - set(rows))
    else:
        assert set(rows) == set(walk.rows), (sorted(rows), sorted(walk.rows))
    for row_id, prompt in walk.rows.items():
        row = rows[row_id]
        if row["status"] == "ok" or retry:
            assert row["prompt"] == prompt, (row_id, row, prompt)
        assert (row["status"] == "ok") == bool(row["prompt"]), row
    report = verify_output(str(walk.output), spec=spec_from_dict(spec))
    assert report.ok, report.format()
    assert (walk.output / "_SUCCESS").exists()


def step(walk: Walk) -> None:
    """An input edit, then a run (maybe killed), checked."""
    edit = edit_input(walk)
    rng = walk.rng
    accumulate = rng.random() < 0.4
    retry = rng.random() < 0.3
    kill = rng.random() < 0.2
    overwrite = rng.random() < 0.05
    spec = walk.spec(accumulate)
    if overwrite:
        spec["output"]["overwrite"] = True
    refusal = expected_refusal(walk, accumulate, overwrite)
    walk.log.append(
        f"{edit} -> {len(walk.rows)} rows; run accumulate={accumulate} retry={retry} "
        f"kill={kill} overwrite={overwrite}; expect {refusal or 'success'}"
    )
    before = snapshot(walk.output)
    keys_before = {row["key"] for row in committed(walk.output).values()} if before else set()
    if kill and refusal is None:
        run_and_kill(walk, spec, retry)
        start_local_ray()  # the killed run had a cluster of its own; ours is untouched
        kept = {row["key"] for row in committed(walk.output).values()}
        if not overwrite:
            assert keys_before <= kept, sorted(keys_before - kept)
        walk.outcomes["killed"] += 1
        return
    code = run_in_process(spec, retry)
    if refusal is not None:
        assert code == 2, f"expected a refusal ({refusal}), got exit {code}"
        assert snapshot(walk.output) == before, "a refused run changed the output"
        walk.outcomes["refused"] += 1
        return
    assert code == 0, f"expected success, got exit {code}"
    check_success(walk, spec, accumulate, retry)
    walk.outcomes["succeeded" + (" with --retry-failed" if retry else "")] += 1


def test_random_walks_over_the_commit_protocol_keep_its_promises(tmp_path, capsys):
    seed = int(os.environ.get("KOALA_WALK_SEED", random.randrange(2**32)))
    seconds = float(os.environ.get("KOALA_WALK_SECONDS", 0))
    walk = Walk(root=tmp_path, rng=random.Random(seed))
    walk.new_rows(5)
    started = time.monotonic()

    def more() -> bool:
        elapsed = time.monotonic() - started
        if seconds:
            return elapsed < seconds
        return len(walk.log) < MIN_STEPS or (len(walk.log) < CI_STEPS and elapsed < CI_SECONDS)

    try:
        while more():
            step(walk)
    except BaseException:
        with capsys.disabled():
            print(f"\nKOALA_WALK_SEED={seed} failed at step {len(walk.log)}:", file=sys.stderr)
            print("\n".join(f"  {n}. {line}" for n, line in enumerate(walk.log, 1)))
        raise
    with capsys.disabled():
        print(f"\nwalk seed {seed}: {len(walk.log)} steps, {dict(walk.outcomes)}", file=sys.stderr)
