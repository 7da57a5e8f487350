"""`koala-batch inspect`: what a committed output holds, as a table and two pictures.

Everything comes from the committed manifests (through `layout` and `Storage`, like
`verify`), not from `_SUCCESS`, so an output still being written can be inspected too:

- the summary table: images, failures by reason, shards, bytes, images/s over the span
  from the first image generated to the last shard committed, GPU-seconds per image
  (the shards' pipeline seconds over their ok images), and, when `_SUCCESS` is there, the
  last run's GPU-hours and cost (its `cost` section);
- `contact_sheet.png`: sampled ok images in a grid, each captioned with its prompt;
- `throughput.png`: images committed over time, from each shard's recorded stats.

Images are read by `read_images`, the one place that knows how each output format
stores them.

Named `report`, not `inspect`: a module called inspect would shadow the standard
library's in tracebacks.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import random
import textwrap
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from koala_batch.errors import UsageError
from koala_batch.output.formats import FORMATS
from koala_batch.output.layout import (
    SUCCESS_FILE,
    list_output,
    manifest_path,
    recorded_format,
    recorded_stats,
)
from koala_batch.output.stats import add_failures, cost_lines, shard_stats
from koala_batch.schemas import STATUS_OK, Col
from koala_batch.storage import Storage

CONTACT_SHEET = "contact_sheet.png"
THROUGHPUT = "throughput.png"
# Contact-sheet geometry, in pixels: each image is fitted into a square of `tile` (TILE
# unless given), its caption
# (CAPTION_LINES lines at most) below it, MARGIN around and between the tiles.
TILE = 192
CAPTION_LINES = 3
LINE_HEIGHT = 14
MARGIN = 8
MAX_COLUMNS = 6
_MANIFEST_COLUMNS = [Col.KEY, Col.PROMPT, Col.STATUS, Col.ERROR, Col.MEMBER, Col.BYTES]


@dataclass(frozen=True)
class ShardView:
    """One committed shard as inspect sees it: its format, its stats and its rows."""

    name: str
    output_format: str
    stats: dict[str, Any]
    rows: pa.Table  # key, prompt, status, error, member, bytes


@dataclass(frozen=True)
class OutputView:
    """The committed shards of an output and the bytes it holds."""

    url: str
    shards: list[ShardView]
    total_bytes: int  # every file under the output
    has_success: bool
    cost: dict[str, Any] | None = None  # `_SUCCESS`'s cost section, if it has one


def recorded_cost(storage: Storage) -> dict[str, Any] | None:
    """The `cost` section of the output's `_SUCCESS`; None if there is none (no record, an
    unreadable one, or one written before costs were recorded): inspect shows no cost."""
    try:
        record = json.loads(storage.read_bytes(SUCCESS_FILE))
    except (OSError, ValueError):
        return None
    cost = record.get("cost") if isinstance(record, dict) else None
    return cost if isinstance(cost, dict) else None


def load_output(storage: Storage) -> OutputView:
    """Read every committed manifest of an output (UsageError if it has none)."""
    listing = list_output(storage)
    if not listing.committed:
        raise UsageError(
            f"output {storage.url('')} has no committed shard (no manifests under "
            f"{storage.url('manifests')}); give the output prefix of a koala-batch job"
        )

    def read(shard: str) -> ShardView:
        data = storage.read_bytes(manifest_path(shard))
        manifest = pq.read_table(io.BytesIO(data), columns=_MANIFEST_COLUMNS)
        stats = recorded_stats(manifest.schema) or shard_stats(manifest)
        return ShardView(
            name=shard,
            # A manifest recording no format is not this version's: shown, never read.
            output_format=recorded_format(manifest.schema) or "unrecorded",
            stats=stats,
            rows=manifest,
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        shards = list(pool.map(read, listing.committed))
    return OutputView(
        url=storage.url(""),
        shards=shards,
        total_bytes=sum(listing.sizes.values()),
        has_success=listing.has_success,
        cost=recorded_cost(storage) if listing.has_success else None,
    )


def summarize(view: OutputView) -> dict[str, Any]:
    """The numbers of the summary table."""
    failures: dict[str, int] = {}
    rows = ok = image_bytes = 0
    generate_s = 0.0
    timed = False
    starts: list[float] = []
    commits: list[float] = []
    for shard in view.shards:
        stats = shard.stats
        rows += stats["rows"]
        ok += stats["ok"]
        image_bytes += stats.get("image_bytes") or 0
        add_failures(failures, stats.get("failures"))
        if stats.get("generate_s") is not None:
            generate_s += stats["generate_s"]
            timed = True
        if stats.get("first_generated_at") is not None:
            starts.append(stats["first_generated_at"])
        if stats.get("committed_at") is not None:
            commits.append(stats["committed_at"])
    span = (max(commits) - min(starts)) if starts and commits else None
    return {
        "output": view.url,
        "complete": view.has_success,
        "images": rows,
        "ok": ok,
        "failed": rows - ok,
        "failures": dict(sorted(failures.items(), key=lambda item: (-item[1], item[0]))),
        "shards": len(view.shards),
        "formats": sorted({shard.output_format for shard in view.shards}),
        "bytes": view.total_bytes,
        "image_bytes": image_bytes,
        "span_s": span,
        "images_per_s": rows / span if span else None,
        "gpu_s_per_image": generate_s / ok if timed and ok else None,
        "cost": view.cost,
    }


def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def format_summary(summary: dict[str, Any]) -> str:
    """The summary table as text, one figure a line."""

    def number(value: float | None, digits: int) -> str:
        return "n/a (not recorded)" if value is None else f"{value:.{digits}f}"

    lines = [
        ("output", summary["output"] + ("" if summary["complete"] else " (no _SUCCESS yet)")),
        ("images", str(summary["images"])),
        ("ok", str(summary["ok"])),
        ("failed", str(summary["failed"])),
        *((f"  {reason}", str(count)) for reason, count in summary["failures"].items()),
        ("shards", f"{summary['shards']} ({', '.join(summary['formats'])})"),
        ("bytes", f"{_human_bytes(summary['bytes'])} ({summary['bytes']} B)"),
        ("images/s", number(summary["images_per_s"], 3)),
        ("GPU-s/image", number(summary["gpu_s_per_image"], 4)),
        *cost_lines(summary.get("cost")),
    ]
    width = max(len(label) for label, _ in lines)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in lines)


def read_images(
    storage: Storage, shard: str, output_format: str, rows: Sequence[dict[str, Any]]
) -> dict[str, bytes]:
    """The encoded bytes of some ok rows of one shard, by key, for any output format."""
    if output_format not in FORMATS:
        raise UsageError(f"shard {shard}: unknown output format {output_format!r}")
    return FORMATS[output_format].read_images(storage, shard, rows)


def sample_images(
    storage: Storage, view: OutputView, count: int, seed: int = 0
) -> list[tuple[bytes, str]]:
    """`count` ok images chosen at random (the same ones for the same seed), in output
    order, each with its prompt."""
    candidates = [
        (shard, row)
        for shard in view.shards
        for row in shard.rows.to_pylist()
        if row[Col.STATUS] == STATUS_OK and row[Col.MEMBER]
    ]
    chosen = sorted(random.Random(seed).sample(range(len(candidates)), min(count, len(candidates))))
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for index in chosen:
        shard, row = candidates[index]
        by_shard.setdefault(shard.name, []).append(row)
    formats = {shard.name: shard.output_format for shard in view.shards}
    images: dict[str, bytes] = {}
    for name, rows in by_shard.items():
        images.update(read_images(storage, name, formats[name], rows))
    return [
        (images[row[Col.KEY]], row[Col.PROMPT] or "")
        for row in (candidates[index][1] for index in chosen)
    ]


def sheet_size(count: int, tile: int = TILE, columns: int | None = None) -> tuple[int, int]:
    """(width, height) in pixels of a contact sheet of `count` images."""
    columns = columns or min(MAX_COLUMNS, max(1, math.ceil(math.sqrt(count))))
    grid_rows = max(1, math.ceil(count / columns))
    cell_height = tile + CAPTION_LINES * LINE_HEIGHT + MARGIN
    return columns * (tile + MARGIN) + MARGIN, grid_rows * cell_height + MARGIN


def _caption(text: str, font: Any, draw: ImageDraw.ImageDraw, tile: int) -> list[str]:
    """The prompt wrapped to the tile's width, cut to CAPTION_LINES lines."""
    text = " ".join(text.split())
    chars = max(8, min(len(text), 60))
    while chars > 8:
        lines = textwrap.wrap(text, chars) or [""]
        if all(draw.textlength(line, font=font) <= tile for line in lines):
            break
        chars -= 2
    lines = textwrap.wrap(text, chars) or [""]
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 1)].rstrip() + "…"
    return lines


def contact_sheet(
    images: Sequence[tuple[bytes, str]], path: Path, tile: int = TILE
) -> tuple[int, int]:
    """Write a PNG grid of encoded images, each captioned with its text; its size back."""
    width, height = sheet_size(len(images), tile)
    columns = (width - MARGIN) // (tile + MARGIN)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    cell_height = tile + CAPTION_LINES * LINE_HEIGHT + MARGIN
    for index, (data, caption) in enumerate(images):
        left = MARGIN + (index % columns) * (tile + MARGIN)
        top = MARGIN + (index // columns) * cell_height
        with Image.open(io.BytesIO(data)) as image:
            picture = image.convert("RGB")
        scale = tile / max(picture.size)
        fitted = picture.resize(
            (max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
            Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS,
        )
        sheet.paste(fitted, (left + (tile - fitted.width) // 2, top + (tile - fitted.height) // 2))
        for line_number, line in enumerate(_caption(caption, font, draw, tile)):
            draw.text(
                (left, top + tile + 2 + line_number * LINE_HEIGHT), line, fill="black", font=font
            )
    sheet.save(path, format="PNG", optimize=True)
    return width, height


def throughput_plot(view: OutputView, path: Path, size: tuple[int, int] = (800, 450)) -> None:
    """Write a PNG of images committed over time (minutes since the first image was
    generated), from the shards' recorded commit moments."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    figure = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    timed = sorted(
        (shard.stats["committed_at"], shard.stats["rows"])
        for shard in view.shards
        if shard.stats.get("committed_at") is not None
    )
    starts = [
        shard.stats["first_generated_at"]
        for shard in view.shards
        if shard.stats.get("first_generated_at") is not None
    ]
    if timed:
        origin = min([*starts, timed[0][0]])
        minutes = [0.0] + [(moment - origin) / 60 for moment, _ in timed]
        committed = [0]
        for _, rows in timed:
            committed.append(committed[-1] + rows)
        axes.step(minutes, committed, where="post", label="images committed")
        axes.plot(minutes[-1:], committed[-1:], "o")
        if minutes[-1] > 0:
            rate = committed[-1] / (minutes[-1] * 60)
            axes.plot(
                [0, minutes[-1]], [0, committed[-1]], "--", label=f"average {rate:.2f} images/s"
            )
        axes.legend(loc="upper left")
        started = datetime.fromtimestamp(origin, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        axes.set_xlabel(f"minutes since the first image ({started})")
    else:
        axes.text(0.5, 0.5, "no commit times recorded", ha="center", va="center")
        axes.set_xlabel("minutes")
    axes.set_ylabel("images")
    axes.set_title(f"Throughput: {view.url}", fontsize=9)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=dpi)


def default_out_dir(url: str, now: datetime | None = None) -> Path:
    """`inspect-<output name>-<UTC timestamp>` in the current directory."""
    name = posixpath.basename(url.rstrip("/")) or "output"
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    return Path.cwd() / f"inspect-{name}-{stamp}"


def make_out_dir(out_dir: Path) -> None:
    """Make inspect's --out folder; UsageError naming it where a file is in the way or it
    may not be made."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(
            f"--out {out_dir}: a file stands where that folder is needed; give --out a new "
            "or empty folder"
        ) from None
    except OSError as exc:
        raise UsageError(
            f"--out {out_dir} cannot be made ({exc.strerror or exc}); give --out a folder "
            "you may write"
        ) from None


@dataclass(frozen=True)
class Inspection:
    """What `inspect_output` found and wrote."""

    summary: dict[str, Any]
    table: str
    contact_sheet: Path
    throughput: Path


def inspect_output(
    uri: str,
    out_dir: Path | None = None,
    samples: int = 16,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
    tile: int = TILE,
) -> Inspection:
    """Summarize an output and write its contact sheet and throughput plot into `out_dir`
    (default: a new folder in the current directory); never overwrites a file there."""
    if samples < 1:
        raise UsageError(f"--samples must be at least 1 (got {samples})")
    if not 16 <= tile <= 1024:
        raise UsageError(f"--tile must be 16 to 1024 pixels (got {tile})")
    storage = Storage(uri, storage_options)
    view = load_output(storage)
    out_dir = out_dir or default_out_dir(view.url)
    targets = [out_dir / CONTACT_SHEET, out_dir / THROUGHPUT]
    existing = [str(target) for target in targets if target.exists()]
    if existing:
        raise UsageError(
            f"{', '.join(existing)} already exist(s); give --out a new or empty folder"
        )
    make_out_dir(out_dir)
    summary = summarize(view)
    contact_sheet(sample_images(storage, view, samples, seed), targets[0], tile)
    throughput_plot(view, targets[1])
    return Inspection(summary, format_summary(summary), targets[0], targets[1])
