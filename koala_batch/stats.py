"""Per-shard statistics, and the one rule that turns an error text into a failure reason.

The writer computes a shard's stats (`shard_stats`) and records them twice: in the
manifest's Parquet key-value metadata (`layout.stats_metadata`), so that a reader of a
committed output finds them without the job record, and in the summary row it returns,
which the job record (`_SUCCESS`) totals.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from koala_batch.schemas import STATUS_OK, Col

UNKNOWN_REASON = "unknown"
# Reasons longer than this are cut: a class, not the whole story (the manifest has that).
MAX_REASON_CHARS = 120
# "seed 3.5 is not a whole number": the value varies per row, the reason does not.
_SEED_VALUE = re.compile(r"^seed .+? (?=(?:is|does) )")
_TRAILING_REMARK = re.compile(r"\s*\([^()]*\)$")


def failure_reason(error: str | None) -> str:
    """The reason class of an error row's text, so that failures group by reason.

    - several problems (validate joins them with "; "): the first one counts;
    - "Type: detail" (an exception from the pipeline, e.g. "OutOfMemoryError: CUDA out of
      memory ...") or "prompt column 'p': detail": the part before the first ": ", which
      is the exception type or the column the problem names;
    - a trailing remark in parentheses is dropped, and so is a seed's value
      ("seed 3.5 is not a whole number" -> "seed is not a whole number");
    - no text at all is "unknown".
    """
    if not error or not error.strip():
        return UNKNOWN_REASON
    reason = error.strip().split("; ", 1)[0]
    reason = reason.split(": ", 1)[0]
    reason = _TRAILING_REMARK.sub("", reason)
    reason = _SEED_VALUE.sub("seed ", reason).strip()
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 3].rstrip() + "..."
    return reason or UNKNOWN_REASON


def failures_by_reason(errors: Iterable[str | None]) -> dict[str, int]:
    """Error rows counted by `failure_reason`, most frequent first."""
    counts = Counter(failure_reason(error) for error in errors)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def add_failures(totals: dict[str, int], failures: Any) -> None:
    """Add one shard's failures (a dict, or the (reason, count) pairs that an Arrow map
    column gives back) to `totals`."""
    pairs = failures.items() if isinstance(failures, dict) else (failures or [])
    for reason, count in pairs:
        totals[reason] = totals.get(reason, 0) + int(count)


def _total(values: Sequence[float | None] | None) -> float | None:
    if values is None:
        return None
    return round(sum(value for value in values if value is not None), 6)


def shard_stats(
    manifest: pa.Table,
    *,
    generate_s: Sequence[float | None] | None = None,
    encode_s: Sequence[float | None] | None = None,
    generated_at: Sequence[float | None] | None = None,
    committed_at: float | None = None,
) -> dict[str, Any]:
    """One shard's stats from its manifest rows and its rows' timings (None: not measured).

    `generate_s` and `encode_s` are summed: pipeline seconds and encoding seconds spent on
    the shard's images. `committed_at` is the moment its manifest was written (unix s).
    """
    statuses = manifest.column(Col.STATUS).to_pylist()
    errors = manifest.column(Col.ERROR).to_pylist()
    ok = sum(1 for status in statuses if status == STATUS_OK)
    moments = [moment for moment in (generated_at or []) if moment is not None]
    return {
        "rows": manifest.num_rows,
        "ok": ok,
        "errors": manifest.num_rows - ok,
        "failures": failures_by_reason(
            error for status, error in zip(statuses, errors, strict=True) if status != STATUS_OK
        ),
        "generate_s": _total(generate_s),
        "encode_s": _total(encode_s),
        "image_bytes": int(sum(b for b in manifest.column(Col.BYTES).to_pylist() if b)),
        "first_generated_at": min(moments) if moments else None,
        "last_generated_at": max(moments) if moments else None,
        "committed_at": committed_at,
    }


def as_failures(value: Any) -> dict[str, int] | None:
    """A shard's failures as a dict, whether given as one or as the (reason, count) pairs
    that an Arrow map column gives back; None stays None (not recorded)."""
    if value is None:
        return None
    totals: dict[str, int] = {}
    add_failures(totals, value)
    return totals


def job_totals(shards: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The job record's stats over its shards' summary rows: failures by reason, pipeline
    and encoding seconds, and GPU-seconds per image (pipeline seconds over ok images;
    one accelerator per generator actor). Shards committed before stats were recorded
    add their failures from their error column, no seconds."""
    failures: dict[str, int] = {}
    generate_s = encode_s = 0.0
    ok = 0
    for shard in shards:
        add_failures(failures, shard.get("failures"))
        generate_s += shard.get("generate_s") or 0.0
        encode_s += shard.get("encode_s") or 0.0
        ok += shard.get("ok") or 0
    return {
        "failures_by_reason": dict(sorted(failures.items(), key=lambda item: (-item[1], item[0]))),
        "generate_s": round(generate_s, 3),
        "encode_s": round(encode_s, 3),
        "gpu_s_per_image": round(generate_s / ok, 6) if ok else None,
    }
