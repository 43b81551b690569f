"""Queue depth, as the people who scale the fleet read it: per queue, the messages ready
(every priority step summed), those delivered to a worker and not yet acknowledged, and
how long the oldest job waiting there has waited (from the ledger), for triage and every
tier of the ladder (and a tier's provider-batch queue, where its requests wait to be
sent); for every `vllm` tier, its server's own waiting and running requests (`/metrics`
at the root of the tier's base URL). `publish` sends the same as DogStatsD gauges, tagged
`queue`, `pool` and `tier` (beat runs it every `TIERFLEET_DEPTH_INTERVAL_S`).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from sqlalchemy import case, func, null, select

from tierfleet import constants as C
from tierfleet.constants import JobStatus
from tierfleet.db import Ledger, utc
from tierfleet.metrics import Metrics
from tierfleet.models import BatchRequest, Job
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
    batches: bool = False  # the tier's provider-batch queue: its waiting are collected requests

    @property
    def depth(self) -> int:
        return self.ready + self.unacked


@dataclass(frozen=True, slots=True)
class ServerDepth:
    """A `vllm` tier's server, as its `/metrics` reports it (or why it was not read)."""

    tier: str
    waiting: float | None = None
    running: float | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Depth:
    queues: list[QueueDepth]
    servers: list[ServerDepth] = field(default_factory=list)  # every vllm tier's, when asked

    @property
    def vllm(self) -> dict[str, float] | None:
        """The first vllm tier's reading (the default fleet's small tier), or None."""
        first = next((s for s in self.servers if s.error is None), None)
        if first is None or first.waiting is None or first.running is None:
            return None
        return {"waiting": first.waiting, "running": first.running}

    @property
    def vllm_error(self) -> str | None:
        return next((s.error for s in self.servers if s.error), None) if not self.vllm else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "queues": [asdict(q) | {"depth": q.depth} for q in self.queues],
            "vllm": self.vllm,
            "vllm_error": self.vllm_error,
            "servers": [asdict(s) for s in self.servers],
        }


def queues_of(settings: Settings) -> list[tuple[str, str, str | None]]:
    """(queue, pool, tier) for every job queue, in the order a job meets them."""
    return [
        (settings.queue_triage, "triage", None),
        *((t.queue, t.name, t.name) for t in settings.fleet),
    ]


def read(settings: Settings, ledger: Ledger, client: redis.Redis, *, vllm: bool = True) -> Depth:
    layout = queues_of(settings)
    batch_tiers = [t for t in settings.fleet if t.batch]
    broker = held(client, [q for q, _, _ in layout] + [t.batches_queue for t in batch_tiers])
    now = dt.datetime.now(dt.UTC)

    def age(first: dt.datetime | None) -> float | None:
        return None if first is None else max(0.0, (now - utc(first)).total_seconds())

    stage = case((Job.status == JobStatus.QUEUED, null()), else_=Job.tier)  # None: triage
    waiting = (
        select(stage, func.count(), func.min(Job.updated_at))
        .where(Job.status.in_([JobStatus.QUEUED, JobStatus.TRIAGED]))
        .group_by(stage)
    )
    collected = (
        select(BatchRequest.tier, func.count(), func.min(BatchRequest.collected_at))
        .where(BatchRequest.batch_id.is_(None))
        .group_by(BatchRequest.tier)
    )
    with ledger.begin() as conn:
        by_stage = {tier: (count, oldest) for tier, count, oldest in conn.execute(waiting)}
        by_tier = (
            {tier: (n, oldest) for tier, n, oldest in conn.execute(collected)}
            if batch_tiers
            else {}
        )
    none = (0, None)
    rows = [(q, pool, tier, False, by_stage.get(tier, none)) for q, pool, tier in layout]
    rows += [
        (t.batches_queue, t.name, t.name, True, by_tier.get(t.name, none)) for t in batch_tiers
    ]
    out = [
        QueueDepth(
            queue=queue, pool=pool, tier=tier, ready=broker.ready.get(queue, 0),
            unacked=broker.unacked.get(queue, 0), waiting_jobs=n, oldest_wait_s=age(first),
            batches=batches,
        )
        for queue, pool, tier, batches, (n, first) in rows
    ]  # fmt: skip
    return Depth(out, read_servers(settings) if vllm else [])


def read_servers(settings: Settings) -> list[ServerDepth]:
    """Every `vllm` tier's server queue; an unreachable server is a reading, not a failure."""
    out = []
    for tier in settings.fleet:
        url = settings.tier_base_url(tier)
        if tier.backend != "vllm" or settings.simulated(tier) or not url:
            continue
        try:
            from workers.backends.vllm import read_vllm_metrics

            gauges = read_vllm_metrics(url)
        except Exception as exc:  # any failure to read is reported, not raised
            out.append(ServerDepth(tier.name, error=f"{type(exc).__name__}: {exc}"))
            continue
        out.append(ServerDepth(tier.name, gauges.get("waiting", 0.0), gauges.get("running", 0.0)))
    return out


def publish(depth: Depth, metrics: Metrics) -> None:
    for q in depth.queues:
        tags = [f"queue:{q.queue}", f"pool:{q.pool}"] + ([f"tier:{q.tier}"] if q.tier else [])
        metrics.gauge(C.METRIC_QUEUE_DEPTH, q.ready, tags)
        metrics.gauge(C.METRIC_QUEUE_UNACKED, q.unacked, tags)
        metrics.gauge(C.METRIC_QUEUE_OLDEST_S, q.oldest_wait_s or 0.0, tags)
    for s in depth.servers:
        if s.error is not None:
            continue
        tags = [f"tier:{s.tier}", f"pool:{s.tier}"]
        metrics.gauge(C.METRIC_VLLM_WAITING, s.waiting or 0.0, tags)
        metrics.gauge(C.METRIC_VLLM_RUNNING, s.running or 0.0, tags)
