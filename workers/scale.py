"""Replicas each pool needs: enough workers to drain what waits on its queues within the
target drain time, at the throughput one worker of the pool shows in the ledger.

One tier worker keeps its tier's `concurrency` calls in flight, so it finishes about
`concurrency / mean attempt latency` attempts a second (Little's law), the latency read
from the tier's attempts over the last `TIERFLEET_SCALE_WINDOW_S`; with none yet, every
call is taken to last its whole timeout. Triage's time per job is not in the ledger; one
triage worker is taken at `TIERFLEET_SCALE_TRIAGE_JOBS_PER_S`. Each recommendation is
clamped to the pool's limits: the tier's `replicas_min` and `replicas_max` (the default
fleet's from `TIERFLEET_SCALE_SLM_MIN` and the like), triage's from
`TIERFLEET_SCALE_TRIAGE_MIN`/`_MAX`. An idle pool goes to its minimum, which for an API
tier is 0 by default: it scales to zero.
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

# The answer length a tier's timeout is taken at when nothing is measured yet.
_TYPICAL_OUTPUT_TOKENS = 256


@dataclass(frozen=True, slots=True)
class Recommendation:
    pool: str
    queue: str  # the pool's job queue
    depth: int  # ready and unacknowledged messages on the pool's queues
    per_worker_jobs_per_s: float
    basis: str  # how the per-worker rate was found
    wanted: int  # before the limits
    replicas: int
    min_replicas: int
    max_replicas: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def limits(settings: Settings, pool: str) -> tuple[int, int]:
    if pool == "triage":
        return settings.scale_triage_min, settings.scale_triage_max
    tier = settings.fleet.tier(pool)
    return tier.replicas_min, tier.replicas_max


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
    for tier in settings.fleet:
        avg_ms, n = measured.get(tier.name, (0.0, 0))
        if n and avg_ms > 0:
            rates[tier.name] = (
                tier.concurrency / (avg_ms / 1000),
                f"{n} attempts, mean {avg_ms:.0f} ms",
            )
        else:  # nothing measured yet: assume every call takes its whole timeout
            timeout_s = tier.timeout_for(_TYPICAL_OUTPUT_TOKENS)
            rates[tier.name] = (tier.concurrency / timeout_s, "no recent attempts: the timeout")
    return rates


def recommend(settings: Settings, ledger: Ledger, depth: Depth) -> list[Recommendation]:
    """One recommendation per pool (triage, then every tier in ladder order), from the
    depth of all the pool's queues (a tier's job queue and its provider-batch queue)."""
    rates = per_worker_rates(settings, ledger)
    pools: dict[str, tuple[str, int]] = {}
    for q in depth.queues:
        queue, total = pools.get(q.pool, (q.queue, 0))  # a job queue comes before its batches'
        pools[q.pool] = (queue, total + q.depth)
    out = []
    for pool, (queue, backlog) in pools.items():
        rate, basis = rates[pool]
        lo, hi = limits(settings, pool)
        wanted = math.ceil(backlog / (rate * settings.scale_drain_s)) if backlog else 0
        out.append(
            Recommendation(
                pool=pool, queue=queue, depth=backlog, per_worker_jobs_per_s=round(rate, 2),
                basis=basis, wanted=wanted, replicas=min(hi, max(lo, wanted)),
                min_replicas=lo, max_replicas=hi,
            )
        )  # fmt: skip
    return out


def publish(recommendations: list[Recommendation], metrics: Metrics) -> None:
    for r in recommendations:
        tier = [] if r.pool == "triage" else [f"tier:{r.pool}"]
        tags = [f"pool:{r.pool}", f"queue:{r.queue}", *tier]
        metrics.gauge(C.METRIC_REPLICAS_WANTED, r.replicas, tags)
