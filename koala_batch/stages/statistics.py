"""Where each generator actor's time went: the record it keeps and the job's summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class GeneratorStats:
    """Where one generator actor's time went: the busy fraction's numerator and span."""

    worker: str
    started_at: float
    ready_at: float | None = None
    first_call_at: float | None = None
    last_call_end: float | None = None
    pipeline_s: float = 0.0
    calls: int = 0
    images: int = 0

    def record_call(self, started: float, ended: float, images: int) -> None:
        if self.first_call_at is None:
            self.first_call_at = started
        self.last_call_end = ended
        self.pipeline_s += ended - started
        self.calls += 1
        self.images += images

    def snapshot(self) -> dict[str, Any]:
        return asdict(self)


def busy_summary(snapshots: Sequence[dict[str, Any]], ended_at: float) -> dict[str, Any]:
    """The generators' busy fractions for the job record, from their GeneratorStats.

    Per actor, `busy_fraction` is pipeline seconds over the actor's life until the end of
    execution (model load and waiting for work count as idle): the share of the
    accelerator time paid for that made images. `steady_busy_fraction` leaves out
    start-up and the tail: pipeline seconds from the first call's start to the last
    call's end.
    """
    actors = []
    pipeline_s = life_s = 0.0
    for snapshot in sorted(snapshots, key=lambda snapshot: snapshot["started_at"]):
        life = max(ended_at - snapshot["started_at"], 1e-9)
        pipeline_s += snapshot["pipeline_s"]
        life_s += life
        first, last = snapshot["first_call_at"], snapshot["last_call_end"]
        steady = (last - first) if first is not None and last is not None else 0.0
        ready = snapshot["ready_at"]
        actors.append(
            {
                "worker": snapshot["worker"],
                "load_s": round(ready - snapshot["started_at"], 3) if ready else None,
                "calls": snapshot["calls"],
                "images": snapshot["images"],
                "pipeline_s": round(snapshot["pipeline_s"], 3),
                "life_s": round(life, 3),
                "busy_fraction": round(snapshot["pipeline_s"] / life, 4),
                "steady_busy_fraction": (
                    round(snapshot["pipeline_s"] / steady, 4) if steady > 0 else None
                ),
            }
        )
    return {
        "actors": len(actors),
        "images": sum(actor["images"] for actor in actors),
        "pipeline_s": round(pipeline_s, 3),
        "busy_fraction": round(pipeline_s / life_s, 4) if life_s else None,
        "per_actor": actors,
    }
