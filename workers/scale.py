"""Replicas each pool needs: enough workers to drain what waits on its queue within the
target drain time, at the throughput one worker of the pool shows in the ledger.

One tier worker keeps `concurrency` calls in flight, so it finishes about
`concurrency / mean attempt latency` attempts a second (Little's law), the latency read
from the tier's attempts over the last `TIERFLEET_SCALE_WINDOW_S`. Triage's time per job
is not in the ledger; one triage worker is taken at `TIERFLEET_SCALE_TRIAGE_JOBS_PER_S`.
Each recommendation is clamped to the pool's minimum and maximum; an idle pool goes to its
minimum, which for the API workers (frontier) is 0: they scale to zero.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select

from tierfleet import constants as C
from tierfleet.db import Ledger
from tierfleet.metrics import Metrics
from tierfleet.models import Attempt
from tierfleet.settings import Settings
from workers.depth import Depth


@dataclass(frozen=True, slots=True)
class Recommendation:
    pool: str
    queue: str
    depth: int  # ready and unacknowledged messages
    per_worker_jobs_per_s: float
    basis: str  # how the per-worker rate was found
    wanted: int  # before the limits
    replicas: int
    min_replicas: int
    max_replicas: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def limits(settings: Settings, pool: str) -> tuple[int, int]:
    return {
        "triage": (settings.scale_triage_min, settings.scale_triage_max),
        C.TIER_SLM: (settings.scale_slm_min, settings.scale_slm_max),
        C.TIER_FRONTIER: (settings.scale_frontier_min, settings.scale_frontier_max),
    }[pool]


def per_worker_rates(settings: Settings, ledger: Ledger) -> dict[str, tuple[float, str]]:
    since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=settings.scale_window_s)
    query = (
        select(Attempt.tier, func.avg(Attempt.latency_ms), func.count())
        .where(Attempt.created_at >= since)
        .group_by(Attempt.tier)
    )
    with ledger.begin() as conn:
        measured = {tier: (float(avg or 0), int(n)) for tier, avg, n in conn.execute(query)}
    rates = {"triage": (settings.scale_triage_jobs_per_s, "TIERFLEET_SCALE_TRIAGE_JOBS_PER_S")}
    for tier in C.TIER_LADDER:
        concurrency = (
            settings.slm_concurrency if tier == C.TIER_SLM else settings.frontier_concurrency
        )
        avg_ms, n = measured.get(tier, (0.0, 0))
        if n and avg_ms > 0:
            rates[tier] = (concurrency / (avg_ms / 1000), f"{n} attempts, mean {avg_ms:.0f} ms")
        else:  # nothing measured yet: assume every call takes its whole timeout
            timeout = (
                settings.frontier_timeout_s
                if tier == C.TIER_FRONTIER
                else settings.slm_timeout_s(256)
            )
            rates[tier] = (concurrency / timeout, "no recent attempts: the timeout")
    return rates


def recommend(settings: Settings, ledger: Ledger, depth: Depth) -> list[Recommendation]:
    rates = per_worker_rates(settings, ledger)
    out = []
    for q in depth.queues:
        rate, basis = rates[q.pool]
        lo, hi = limits(settings, q.pool)
        wanted = math.ceil(q.depth / (rate * settings.scale_drain_s)) if q.depth else 0
        out.append(
            Recommendation(
                pool=q.pool,
                queue=q.queue,
                depth=q.depth,
                per_worker_jobs_per_s=round(rate, 2),
                basis=basis,
                wanted=wanted,
                replicas=min(hi, max(lo, wanted)),
                min_replicas=lo,
                max_replicas=hi,
            )
        )
    return out


def publish(recommendations: list[Recommendation], metrics: Metrics) -> None:
    for r in recommendations:
        metrics.gauge(C.METRIC_REPLICAS_WANTED, r.replicas, [f"pool:{r.pool}", f"queue:{r.queue}"])
