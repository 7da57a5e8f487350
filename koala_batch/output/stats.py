"""Per-shard statistics, the one rule that turns an error text into a failure reason, and
a run's GPU-hours and cost (`run_cost`, the job record's `cost` section).

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


def run_cost(
    per_actor: Sequence[dict[str, Any]] | None,
    gpus_per_actor: float | None,
    *,
    images: int,
    gpu_hour_cost: float | None,
) -> dict[str, Any]:
    """The job record's `cost` section: this run's GPU-hours and, with a price, its cost.

    GPU-hours are each generator actor's `life_s` (`generate.busy_summary`: from its start,
    model load included, to the end of execution) times the GPUs it reserves: what the
    cluster held for the run, idle time included. `images` are the ok images this run made;
    `gpu_hour_cost` is compute.gpu_hour_cost. Nothing is estimated: `per_actor` None (the
    statistics were lost) leaves `gpu_hours` None, a run without actors or a CPU-only run
    (0 GPUs per actor) records 0, and either way `note` says why there is no cost.
    """
    gpu_hours: float | None = None
    note: str | None = None
    if per_actor is None:
        note = "not measured: the generators' statistics were unavailable"
    elif not per_actor:
        gpu_hours = 0.0
        note = "no generator actor ran (nothing was left to generate)"
    elif not gpus_per_actor:
        gpu_hours = 0.0
        note = "CPU-only run: 0 GPUs per actor, so no GPU-hours"
    else:
        seconds = sum(actor["life_s"] for actor in per_actor) * gpus_per_actor
        gpu_hours = round(seconds / 3600, 6)
    cost = cost_per_1000 = None
    if gpu_hours and gpu_hour_cost is not None:
        # Each from the figure recorded before it, so the record agrees with itself.
        cost = round(gpu_hours * gpu_hour_cost, 6)
        cost_per_1000 = round(cost / images * 1000, 6) if images else None
    return {
        "actors": None if per_actor is None else len(per_actor),
        "gpus_per_actor": gpus_per_actor,
        "gpu_hours": gpu_hours,
        "images": images,
        "gpu_hour_cost": gpu_hour_cost,
        "cost": cost,
        "cost_per_1000_images": cost_per_1000,
        "note": note,
    }


# The numbers of a cost section, type-checked before they are shown.
_COST_FIGURES = (
    "actors",
    "gpus_per_actor",
    "gpu_hours",
    "gpu_hour_cost",
    "cost",
    "cost_per_1000_images",
)


def _amount(value: float) -> str:
    """A money or hour figure for people: 4 significant digits, whole thousands grouped."""
    return f"{value:,.2f}" if abs(value) >= 1000 else f"{value:.4g}"


def cost_lines(cost: Any) -> list[tuple[str, str]]:
    """A record's `cost` section as (label, value) lines for inspect, verify and the card;
    none for a record without one (written before costs were recorded)."""
    if not isinstance(cost, dict) or "gpu_hours" not in cost:
        return []
    if any(not isinstance(cost.get(name), int | float | None) for name in _COST_FIGURES):
        return []  # a record edited by hand: no figure rather than a wrong one
    hours = cost.get("gpu_hours")
    if hours is None:
        return [("GPU-hours", f"n/a ({cost.get('note') or 'not measured'})")]
    actors, gpus = cost.get("actors"), cost.get("gpus_per_actor")
    held = f"{actors} actor(s) x {gpus:g} GPU, last run" if actors and gpus else "last run"
    lines = [("GPU-hours", f"{_amount(hours)} ({cost.get('note') or held})")]
    price = cost.get("gpu_hour_cost")
    if not hours:
        return lines  # nothing to price; the note says why
    if price is None or cost.get("cost") is None:
        lines.append(("cost", "n/a (compute.gpu_hour_cost not set)"))
    else:
        lines.append(("cost", f"{_amount(cost['cost'])} at {_amount(price)} per GPU-hour"))
        per_1000 = cost.get("cost_per_1000_images")
        lines.append(
            ("cost/1000 images", "n/a (no ok images)" if per_1000 is None else _amount(per_1000))
        )
    return lines


def describe_cost(cost: Any) -> str | None:
    """`cost_lines` as one line ("GPU-hours 0.5 (...); cost ..."); None without a section."""
    lines = cost_lines(cost)
    return "; ".join(f"{label} {value}" for label, value in lines) if lines else None
