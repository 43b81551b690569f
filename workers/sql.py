"""The worker's statements, built once.

These run once or twice per job on the hot path; building a SQLAlchemy statement costs
more Python time than executing a cached one, so each is constructed here at import and
executed with parameters. Every read and write is by primary key.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, func, insert, select, update

from tierfleet.constants import TERMINAL_STATUSES, JobStatus
from tierfleet.models import Attempt, Job

_job = Job.__table__.c


def _p(name: str, column: Any = None) -> Any:
    return bindparam(name, type_=column.type if column is not None else None)


TRIAGE_READ = select(Job.feature, Job.route, Job.latency, Job.payload, Job.status).where(
    Job.id == _p("p_id")
)

# Records a triage decision on a job still queued (executemany for a bulk chunk).
TRIAGE_WRITE_MANY = (
    update(Job)
    .where(Job.id == _p("p_id"), Job.status == JobStatus.QUEUED)
    .values(
        status=JobStatus.TRIAGED,
        tier=_p("p_tier", _job.tier),
        triage_score=_p("p_score", _job.triage_score),
        triage_reason=_p("p_reason", _job.triage_reason),
        triage_version=_p("p_version", _job.triage_version),
    )
)
TRIAGE_WRITE = TRIAGE_WRITE_MANY.returning(Job.id)  # None: someone else triaged it

# A bulk chunk: its queued jobs, locked. A duplicate chunk message running at the same
# time waits for the lock and then, re-checking `status` (READ COMMITTED re-evaluates the
# WHERE on the updated rows), finds them triaged: no job is triaged twice. (SKIP LOCKED
# would skip rows still locked by the transaction that re-queues them, `tierfleet retry`,
# and strand them.)
RANGE_READ = (
    select(Job.id, Job.feature, Job.route, Job.latency, Job.payload)
    .where(
        Job.batch_id == _p("p_batch", _job.batch_id),
        Job.line.between(_p("p_first", _job.line), _p("p_last", _job.line)),
        Job.status == JobStatus.QUEUED,
    )
    .order_by(Job.line)
    .with_for_update()
)

# Running on `p_tier`, in one statement: None when the job moved on (terminal, or on
# another tier). A job already `running` is taken again: its last worker died mid-call.
CLAIM = (
    update(Job)
    .where(
        Job.id == _p("p_id"),
        Job.tier == _p("p_tier", _job.tier),
        Job.status.in_([JobStatus.TRIAGED, JobStatus.RUNNING]),
    )
    .values(status=JobStatus.RUNNING)
    .returning(
        Job.feature,
        Job.route,
        Job.latency,
        Job.payload,
        Job.attempt_count,
        Job.attempt_floor,
        Job.created_at,
    )
)

INSERT_ATTEMPT = insert(Attempt)

OUTCOME_COUNTS = (
    select(Attempt.outcome, func.count())
    .where(
        Attempt.job_id == _p("p_id"),
        Attempt.tier == _p("p_tier", Attempt.__table__.c.tier),
        Attempt.seq > _p("p_floor", Attempt.__table__.c.seq),  # this run's attempts only
    )
    .group_by(Attempt.outcome)
)


def _record(**changes: Any) -> Any:
    """Book an attempt on the job (cost, count) and apply the decision's changes."""
    return (
        update(Job)
        .where(Job.id == _p("p_id"), Job.status.not_in(list(TERMINAL_STATUSES)))
        .values(
            cost_usd=Job.cost_usd + _p("p_cost", _job.cost_usd),
            attempt_count=Job.attempt_count + 1,
            **changes,
        )
    )


RECORD_SUCCEEDED = _record(
    status=JobStatus.SUCCEEDED,
    result=_p("p_result", _job.result),
    error=None,
    finished_at=func.now(),
)
RECORD_FAILED = _record(
    status=JobStatus.FAILED, error=_p("p_error", _job.error), finished_at=func.now()
)
RECORD_ESCALATED = _record(status=JobStatus.TRIAGED, tier=_p("p_tier", _job.tier))
RECORD_RETRY = _record(status=JobStatus.TRIAGED)
