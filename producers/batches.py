"""Following a batch: status, results in input order, cancel, retry."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

from celery import Celery
from sqlalchemy import distinct, func, select, update

from tierfleet import constants as C
from tierfleet.constants import JobStatus
from tierfleet.db import Ledger, utc
from tierfleet.errors import JobNotFound
from tierfleet.models import Attempt, Batch, Job

RATE_WINDOW_S = 60


@dataclass
class BatchStatus:
    batch_id: str
    name: str | None
    created_at: str
    jobs: int
    rejected_lines: int
    by_status: dict[str, int] = field(default_factory=dict)
    by_tier: dict[str, int] = field(default_factory=dict)
    escalated: int = 0
    escalation_rate: float = 0.0
    spend_usd: Decimal = Decimal(0)
    spend_cap_usd: Decimal | None = None
    jobs_per_s: float = 0.0
    eta_s: float | None = None
    cancelled: bool = False

    @property
    def done(self) -> int:
        return sum(self.by_status.get(s.value, 0) for s in C.TERMINAL_STATUSES)

    @property
    def finished(self) -> bool:
        return self.done >= self.jobs

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["spend_usd"] = str(self.spend_usd)
        data["spend_cap_usd"] = None if self.spend_cap_usd is None else str(self.spend_cap_usd)
        data["done"] = self.done
        return data


def _batch(ledger: Ledger, batch_id: str) -> Batch:
    with ledger.session() as s:
        batch = s.get(Batch, batch_id)
    if batch is None:
        raise JobNotFound(f"no batch with id {batch_id!r}")
    return batch


def status(ledger: Ledger, batch_id: str) -> BatchStatus:
    batch = _batch(ledger, batch_id)
    now = dt.datetime.now(dt.UTC)
    in_batch = Job.batch_id == batch_id
    with ledger.begin() as conn:
        by_status = {
            JobStatus(s).value: n
            for s, n in conn.execute(
                select(Job.status, func.count()).where(in_batch).group_by(Job.status)
            )
        }
        by_tier = {
            (t or "untriaged"): n
            for t, n in conn.execute(
                select(Job.tier, func.count()).where(in_batch).group_by(Job.tier)
            )
        }
        multi_tier = (
            select(Attempt.job_id)
            .join(Job, Job.id == Attempt.job_id)
            .where(in_batch)
            .group_by(Attempt.job_id)
            .having(func.count(distinct(Attempt.tier)) > 1)
            .subquery()
        )
        escalated = conn.execute(select(func.count()).select_from(multi_tier)).scalar_one()
        tried = conn.execute(
            select(func.count(distinct(Attempt.job_id))).join(Job).where(in_batch)
        ).scalar_one()
        spend = conn.execute(select(func.coalesce(func.sum(Job.cost_usd), 0)).where(in_batch))
        recent = conn.execute(
            select(func.count()).where(
                in_batch, Job.finished_at >= now - dt.timedelta(seconds=RATE_WINDOW_S)
            )
        ).scalar_one()
        jobs = conn.execute(select(func.count()).where(in_batch)).scalar_one()
    out = BatchStatus(
        batch_id=batch.id,
        name=batch.name,
        created_at=batch.created_at.isoformat() if batch.created_at else "",
        jobs=jobs,
        rejected_lines=batch.rejected,
        by_status=by_status,
        by_tier=by_tier,
        escalated=escalated,
        escalation_rate=escalated / tried if tried else 0.0,
        spend_usd=Decimal(spend.scalar_one()),
        spend_cap_usd=batch.spend_cap_usd,
        cancelled=batch.cancelled_at is not None,
    )
    age_s = max(1.0, (now - utc(batch.created_at)).total_seconds()) if batch.created_at else 1
    out.jobs_per_s = recent / min(RATE_WINDOW_S, age_s)
    remaining = out.jobs - out.done
    out.eta_s = (
        remaining / out.jobs_per_s
        if out.jobs_per_s and remaining
        else (0.0 if not remaining else None)
    )
    return out


def results(ledger: Ledger, batch_id: str) -> Iterator[dict[str, Any]]:
    """One record per job, in input order, streamed from a server-side cursor."""
    _batch(ledger, batch_id)
    query = (
        select(
            Job.line, Job.id, Job.status, Job.tier, Job.result, Job.cost_usd, Job.error,
            Job.attempt_count,
        )
        .where(Job.batch_id == batch_id)
        .order_by(Job.line, Job.id)
    )  # fmt: skip
    with ledger.engine.connect() as conn:
        for row in conn.execution_options(yield_per=1000).execute(query):
            yield {
                "line": row.line,
                "id": row.id,
                "status": JobStatus(row.status).value,
                "tier": row.tier,
                "result": row.result,
                "cost_usd": str(row.cost_usd),
                "attempts": row.attempt_count,
                "error": row.error,
            }


def cancel(ledger: Ledger, batch_id: str) -> int:
    """Unstarted jobs (queued, triaged) become `cancelled`; running ones finish their call,
    and go no further: a worker's claim of a job of a cancelled batch (an escalation, a
    retry) cancels it instead, the reason in its `error`."""
    _batch(ledger, batch_id)
    with ledger.begin() as conn:
        cancelled = conn.execute(
            update(Job)
            .where(
                Job.batch_id == batch_id,
                Job.status.in_([JobStatus.QUEUED, JobStatus.TRIAGED]),
            )
            .values(status=JobStatus.CANCELLED, finished_at=func.now())
        ).rowcount
        conn.execute(update(Batch).where(Batch.id == batch_id).values(cancelled_at=func.now()))
    return int(cancelled)


def retry_failed(ledger: Ledger, celery: Celery, queue: str, batch_id: str) -> int:
    """Failed jobs go back to `queued` (their earlier attempts stay in the ledger, and no
    longer count against the retry limits) and are sent to triage again.

    The messages go out before the reset commits: if sending fails, the jobs are still
    `failed` and the command can simply be run again; if the commit fails after sending,
    triage finds the jobs not `queued` and does nothing."""
    _batch(ledger, batch_id)
    with ledger.begin() as conn:
        reset = conn.execute(
            update(Job)
            .where(Job.batch_id == batch_id, Job.status == JobStatus.FAILED)
            .values(
                status=JobStatus.QUEUED,
                tier=None,
                error=None,
                finished_at=None,
                attempt_floor=Job.attempt_count,
            )
            .returning(Job.id, Job.line)
        ).all()
        lines = sorted(line for _, line in reset if line is not None)
        for first, last in _ranges(lines):
            celery.send_task(C.TASK_TRIAGE_RANGE, args=[batch_id, first, last], queue=queue)
        for job_id, line in reset:
            if line is None:  # a job submitted one by one into the batch
                celery.send_task(C.TASK_TRIAGE, args=[job_id], queue=queue)
    return len(reset)


def _ranges(lines: list[int], most: int = 2000) -> Iterator[tuple[int, int]]:
    """Sorted line numbers as (first, last) spans of consecutive lines, `most` at most."""
    if not lines:
        return
    start = prev = lines[0]
    for line in lines[1:]:
        if line != prev + 1 or line - start >= most:
            yield start, prev
            start = line
        prev = line
    yield start, prev
