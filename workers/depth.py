"""Queue depth, as the people who scale the fleet read it: per queue, the messages ready
(every priority step summed), those delivered to a worker and not yet acknowledged, and
how long the oldest job waiting there has waited (from the ledger); for the small tier,
vLLM's own waiting and running requests. `publish` sends the same as DogStatsD gauges
(beat runs it every `TIERFLEET_DEPTH_INTERVAL_S`).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import asdict, dataclass
from typing import Any

import redis
from sqlalchemy import case, func, null, select

from tierfleet import constants as C
from tierfleet.constants import JobStatus
from tierfleet.db import Ledger, utc
from tierfleet.metrics import Metrics
from tierfleet.models import Job
from tierfleet.settings import Settings
from workers.broker import held

log = logging.getLogger("tierfleet.depth")


@dataclass(frozen=True, slots=True)
class QueueDepth:
    queue: str
    pool: str  # the worker pool that consumes it
    tier: str | None
    ready: int
    unacked: int
    waiting_jobs: int  # jobs the ledger has waiting for this queue's step
    oldest_wait_s: float | None

    @property
    def depth(self) -> int:
        return self.ready + self.unacked


@dataclass(frozen=True, slots=True)
class Depth:
    queues: list[QueueDepth]
    vllm: dict[str, float] | None  # waiting, running; None when not asked or not reached
    vllm_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "queues": [asdict(q) | {"depth": q.depth} for q in self.queues],
            "vllm": self.vllm,
            "vllm_error": self.vllm_error,
        }


def queues_of(settings: Settings) -> list[tuple[str, str, str | None]]:
    """(queue, pool, tier) for every job queue, in the order a job meets them."""
    return [
        (settings.queue_triage, "triage", None),
        *((settings.queue_for(t), t, t) for t in C.TIER_LADDER),
    ]


def read(settings: Settings, ledger: Ledger, client: redis.Redis, *, vllm: bool = True) -> Depth:
    layout = queues_of(settings)
    broker = held(client, [q for q, _, _ in layout])
    now = dt.datetime.now(dt.UTC)
    stage = case((Job.status == JobStatus.QUEUED, null()), else_=Job.tier)  # None: triage
    waiting = (
        select(stage, func.count(), func.min(Job.updated_at))
        .where(Job.status.in_([JobStatus.QUEUED, JobStatus.TRIAGED]))
        .group_by(stage)
    )
    with ledger.begin() as conn:
        by_stage = {
            tier: (count, None if oldest is None else utc(oldest))
            for tier, count, oldest in conn.execute(waiting)
        }
    out = []
    for queue, pool, tier in layout:
        n, first = by_stage.get(tier, (0, None))
        out.append(
            QueueDepth(
                queue=queue,
                pool=pool,
                tier=tier,
                ready=broker.ready.get(queue, 0),
                unacked=broker.unacked.get(queue, 0),
                waiting_jobs=n,
                oldest_wait_s=None if first is None else max(0.0, (now - first).total_seconds()),
            )
        )
    gauges, error = None, None
    if vllm and settings.vllm_base_url and not settings.use_sim_backends:
        try:
            from workers.backends.vllm import read_vllm_metrics

            gauges = read_vllm_metrics(settings.vllm_base_url)
        except Exception as exc:  # an unreachable vLLM is a reading, not a failure
            error = f"{type(exc).__name__}: {exc}"
    return Depth(out, gauges, error)


def publish(depth: Depth, metrics: Metrics) -> None:
    for q in depth.queues:
        tags = [f"queue:{q.queue}", f"pool:{q.pool}"] + ([f"tier:{q.tier}"] if q.tier else [])
        metrics.gauge(C.METRIC_QUEUE_DEPTH, q.ready, tags)
        metrics.gauge(C.METRIC_QUEUE_UNACKED, q.unacked, tags)
        metrics.gauge(C.METRIC_QUEUE_OLDEST_S, q.oldest_wait_s or 0.0, tags)
    if depth.vllm is not None:
        metrics.gauge(C.METRIC_VLLM_WAITING, depth.vllm.get("waiting", 0.0), ["tier:slm"])
        metrics.gauge(C.METRIC_VLLM_RUNNING, depth.vllm.get("running", 0.0), ["tier:slm"])
