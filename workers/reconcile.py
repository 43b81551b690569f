"""The reconciler: Postgres is the system of record, so a job the queues forgot is found
there and sent again.

A job is stranded when its message is gone: Redis lost its data (a flush, a restart
without persistence), a send failed after its commit, or its worker died mid-call. The
reconciler, run by beat every `reconcile_interval_s`, re-drives:

- `running` jobs whose lease lapsed: their worker was lost. The new attempt's claim takes
  the job over and records the lost attempt as `abandoned`.
- `queued` and `triaged` jobs untouched for `stale_after_s`, when the queue they wait on
  has no message ready and no live worker holds one for them (a deep backlog is not a
  loss). The messages a killed worker took stay unacknowledged until the visibility
  timeout, but hold nothing once its beat has lapsed (`workers/holding.py`). Jobs of a
  bulk batch still being submitted are left to its `submit`.

Each re-drive touches `updated_at`, so a job is sent again at most once per
`stale_after_s`. Steps are idempotent, so a message that was only slow, not lost, does no
harm when its copy arrives; nor does a dead worker's, put back by kombu an hour later.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

import redis
from sqlalchemy import and_, or_, select, update

from tierfleet.constants import JobStatus
from tierfleet.models import Batch, Job
from workers.broker import Held, held
from workers.runtime import Runtime

log = logging.getLogger("tierfleet.reconcile")

PER_STATEMENT = 1000  # jobs re-driven per statement; a pass repeats until none are left
PER_PASS = 200_000


def reconcile(
    rt: Runtime,
    send_triage: Callable[[Runtime, list[str]], None],
    send_attempt: Callable[[Runtime, list[tuple[str, str]]], None],
) -> dict[str, int]:
    """One pass. Returns how many jobs were re-driven, by the stage they were in."""
    url = rt.settings.real_redis_url()
    if url is None:
        return {}  # the in-process broker loses nothing it is not told to
    settings = rt.settings
    now = dt.datetime.now(dt.UTC)
    stale = now - dt.timedelta(seconds=settings.stale_after_s)
    tiers = {tier: settings.queue_for(tier) for tier in rt.policy.ladder}
    client = redis.Redis.from_url(url)
    try:
        broker = held(client, [settings.queue_triage, *tiers.values()])
    finally:
        client.close()

    counts = {"running": 0, "queued": 0, "triaged": 0}
    lapsed = and_(
        Job.status == JobStatus.RUNNING,
        Job.lease_until < now,
        or_(Job.updated_at <= Job.lease_until, Job.updated_at < stale),
    )
    counts["running"] = _redrive(rt, lapsed, now, lambda rows: send_attempt(rt, rows))

    if broker.ready.get(settings.queue_triage, 0) == 0:
        submitted = select(Batch.enqueued_through).where(Batch.id == Job.batch_id)
        queued = and_(
            Job.status == JobStatus.QUEUED,
            Job.updated_at < stale,
            or_(Job.batch_id.is_(None), Job.line <= submitted.scalar_subquery()),
            *_not_held(broker),
            *([Job.batch_id.not_in(broker.batch_ids)] if broker.batch_ids else []),
        )
        counts["queued"] = _redrive(
            rt, queued, now, lambda rows: send_triage(rt, [job_id for job_id, _ in rows])
        )
    for tier, queue in tiers.items():
        if broker.ready.get(queue, 0):
            continue
        triaged = and_(
            Job.status == JobStatus.TRIAGED,
            Job.tier == tier,
            Job.updated_at < stale,
            *_not_held(broker),
        )
        counts["triaged"] += _redrive(rt, triaged, now, lambda rows: send_attempt(rt, rows))
    for stage, n in counts.items():
        if n:
            rt.metrics.redriven(stage=stage, count=n)
            log.warning(
                "re-drove stranded jobs",
                extra={"action": "reconcile.redrive", "stage": stage, "jobs": n},
            )
    return counts


def _not_held(broker: Held) -> list[Any]:
    return [Job.id.not_in(broker.job_ids)] if broker.job_ids else []


def _redrive(
    rt: Runtime,
    where: Any,
    now: dt.datetime,
    send: Callable[[list[tuple[str, str]]], None],
) -> int:
    """Touch the matching jobs (skipping rows another reconciler holds) and, once that
    has committed, send their messages. Repeats until none match."""
    total = 0
    while total < PER_PASS:
        pick = (
            select(Job.id)
            .where(where)
            .order_by(Job.updated_at)
            .limit(PER_STATEMENT)
            .with_for_update(skip_locked=True)
        )
        touch = (
            update(Job)
            .where(Job.id.in_(pick.scalar_subquery()))
            .values(updated_at=now)
            .returning(Job.id, Job.tier)
        )
        with rt.ledger.begin() as conn:
            rows = [(row.id, row.tier) for row in conn.execute(touch)]
        if rows:
            send(rows)
        total += len(rows)
        if len(rows) < PER_STATEMENT:
            return total
    return total
