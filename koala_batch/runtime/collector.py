"""The generators' statistics on the driver: a small actor they report to, polled for
progress and summed at the end."""

from __future__ import annotations

import logging
from typing import Any

from koala_batch.runtime.console import JobProgress, Poller
from koala_batch.runtime.failures import describe_failure
from koala_batch.stages.statistics import busy_summary

logger = logging.getLogger(__name__)


def start_stats_collector() -> Any:
    """A small actor the generators report their GeneratorStats to, after every batch."""
    import ray

    @ray.remote(num_cpus=0)
    class GeneratorStatsCollector:
        def __init__(self) -> None:
            self.workers: dict[str, dict[str, Any]] = {}

        def report(self, snapshot: dict[str, Any]) -> None:
            self.workers[snapshot["worker"]] = snapshot

        def collect(self) -> list[dict[str, Any]]:
            return list(self.workers.values())

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node: a worker node can be taken away mid-job, the driver's cannot
    # without ending the job anyway. Hard affinity: Ray places a zero-CPU actor with a
    # soft one on another node (seen on Ray 2.60, every time).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return GeneratorStatsCollector.options(  # type: ignore[attr-defined]
        scheduling_strategy=here
    ).remote()


def collect_busy_summary(collector: Any, ended_at: float) -> dict[str, Any]:
    """The generators' busy summary, or an empty one if the collector cannot answer: the
    images are committed either way, and the record must still be written."""
    import ray

    try:
        return busy_summary(ray.get(collector.collect.remote(), timeout=60), ended_at)
    except Exception as exc:  # noqa: BLE001 - statistics never fail a finished job
        logger.warning("generator statistics unavailable: %s", describe_failure(exc))
        return {}


# How often the driver asks the generators' statistics how many images they made.
PROGRESS_POLL_S = 2.0


def poll_progress(progress: JobProgress, collector: Any) -> Poller:
    """Feed `progress` the images the generators made (not yet committed) from the stats
    collector, in a thread: the driver loop blocks until the next shard commits."""
    import ray

    def poll() -> None:
        snapshots = ray.get(collector.collect.remote(), timeout=5 * PROGRESS_POLL_S)
        firsts = [s["first_call_at"] for s in snapshots if s["first_call_at"] is not None]
        progress.set_generated(sum(s["images"] for s in snapshots), min(firsts, default=None))
        progress.report()

    return Poller(poll, PROGRESS_POLL_S, logger).start()
