"""Planned-key benchmark: what deciding a run by keys costs the driver as the input grows.

Every run plans the input's key set, each key with what its image is made from
(`validate.planned_keys`), and compares it with the committed one (`coverage`: stale,
changed and missing keys). Each row count runs in a fresh Python process, so its peak
RSS (getrusage ru_maxrss) is its own: the prompt table is written to a local Parquet file
first, then timed are planning the input (footers, ids), building the planned key set
(reading every row and expanding it as the validate stage does), and the comparisons
against a committed key set of the same keys, as a resume of a finished output makes them.

    python -m bench.planned_keys --rows 100000,1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common

NAME = "planned_keys"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.planned_keys", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--rows",
        type=common.parse_int_list,
        default=[100_000, 1_000_000],
        help="prompt-table row counts, each in its own process (default: 100000,1000000)",
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure(rows: int) -> dict[str, Any]:
    """Plan `rows` rows and compare them with themselves as committed; seconds and RSS."""
    import pyarrow.parquet as pq

    from koala_batch.inputs.files import plan_input
    from koala_batch.inputs.rows import planned_keys
    from koala_batch.output.commit import CommittedState
    from koala_batch.output.coverage import changed_images, stale_keys
    from koala_batch.spec import spec_from_dict

    with tempfile.TemporaryDirectory(prefix="kb-planned-") as scratch:
        path = Path(scratch, "prompts.parquet")
        pq.write_table(common.prompt_table(rows), path, row_group_size=100_000)
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        spec = spec_from_dict(
            {
                "input": {"uri": str(path), "prompt_column": "prompt", "id_column": "id"},
                "model": {"name": "tiny"},
                "output": {"uri": str(Path(scratch, "out"))},
            }
        )
        started = time.perf_counter()
        plan = plan_input(spec.input, None, spec.output.uri, images_per_prompt=1)
        planned_at = time.perf_counter()
        planned = planned_keys(spec, plan)
        keyed_at = time.perf_counter()
        committed = CommittedState(keys=planned)
        stale, changed = stale_keys(committed, planned), changed_images(committed, planned)
        missing = planned.difference(committed.keys)
        compared_at = time.perf_counter()
    assert len(planned) == rows and not (len(stale) or len(changed) or len(missing))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "rows": rows,
        "plan_s": round(planned_at - started, 3),
        "planned_keys_s": round(keyed_at - planned_at, 3),
        "compare_s": round(compared_at - keyed_at, 3),
        "total_s": round(compared_at - started, 3),
        "rows_per_s": round(rows / (keyed_at - started)),
        "peak_rss_mb": round(peak),
        "rss_above_import_mb": round(peak - baseline),
        "key_set_mb": round(2 * planned.digests.nbytes / 2**20, 1),  # keys and made_from
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(measure(args.child)))
        return
    results = []
    for rows in args.rows:
        child = subprocess.run(
            [sys.executable, "-m", "bench.planned_keys", "--child", str(rows)],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    columns = ["rows", "plan_s", "planned_keys_s", "compare_s", "total_s", "rows_per_s"]
    columns += ["peak_rss_mb", "rss_above_import_mb", "key_set_mb"]
    common.print_table(results, columns, title="planning and comparing keys, per row count")
    path = common.write_result(NAME, {"rows": args.rows}, results)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
