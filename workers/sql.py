"""The worker's statements, built once.

These run once or twice per job on the hot path; building a SQLAlchemy statement costs
more Python time than executing a cached one, so each is constructed here at import and
executed with parameters. Every read and write is by primary key.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    not_,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from tierfleet.constants import ESCALATING_OUTCOMES, TERMINAL_STATUSES, JobStatus, Outcome
from tierfleet.models import (
    Attempt,
    Batch,
    BatchRequest,
    Budget,
    BudgetSpend,
    DeadLetter,
    Job,
)

_job = Job.__table__.c
_batch = Batch.__table__.c


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

# The job's batch has a spend cap and has reached it: no new call starts.
_cap_reached = and_(_batch.spend_cap_usd.is_not(None), _batch.spent_usd >= _batch.spend_cap_usd)
_CAP_REACHED = select(_batch.id).where(_batch.id == Job.batch_id, _cap_reached).exists()
# The job's batch was cancelled: no new call starts, on any tier.
_CANCELLED = (
    select(_batch.id).where(_batch.id == Job.batch_id, _batch.cancelled_at.is_not(None)).exists()
)
# Either: one look at the batch's row, for the common claim.
_BATCH_STOPPED = (
    select(_batch.id)
    .where(_batch.id == Job.batch_id, or_(_batch.cancelled_at.is_not(None), _cap_reached))
    .exists()
)

# Running on `p_tier` under a lease, in one statement: None when the job moved on
# (terminal, on another tier, or running under a live lease), or when its batch was
# cancelled or reached its spend cap. A `running` job whose lease lapsed is taken over:
# its worker was lost mid-call (unless its batch was cancelled). SET sees the row as it
# was, so `lost_leased_at` comes back non-null exactly when this claim took a job over.
_RUNNING = JobStatus.RUNNING
_TRIAGED_TO_RUN = and_(Job.status == JobStatus.TRIAGED, not_(_BATCH_STOPPED))
_LOST_SINCE = case((Job.status == _RUNNING, Job.leased_at), else_=null())
_CLAIM = (
    update(Job)
    .values(
        status=_RUNNING,
        attempt_count=Job.attempt_count + 1,
        updated_at=_p("p_now", _job.updated_at),  # one clock for the lease and its staleness
        leased_at=_p("p_now", _job.leased_at),
        lease_until=_p("p_until", _job.lease_until),
        lost_leased_at=_LOST_SINCE,
        hold_reason=None,
    )
    .returning(
        Job.feature,
        Job.route,
        Job.latency,
        Job.payload,
        Job.attempt_count,
        Job.attempt_floor,
        Job.created_at,
        Job.lost_leased_at,
        Job.triage_score,
        Job.batch_id,
        select(_batch.spend_cap_usd)
        .where(_batch.id == Job.batch_id)
        .scalar_subquery()
        .label("spend_cap_usd"),
    )
)
_ON_TIER = and_(Job.id == _p("p_id"), Job.tier == _p("p_tier", _job.tier))
_LEASE_LAPSED = and_(
    Job.status == _RUNNING,
    or_(Job.lease_until.is_(None), Job.lease_until < _p("p_now", _job.lease_until)),
)
CLAIM = _CLAIM.where(_ON_TIER, or_(_TRIAGED_TO_RUN, and_(_LEASE_LAPSED, not_(_CANCELLED))))
# The common case alone, in a statement of its own (autocommit): a triaged job. Its
# `lost_leased_at` comes back null; None back, and the full CLAIM decides.
CLAIM_TRIAGED = _CLAIM.where(_ON_TIER, _TRIAGED_TO_RUN)
# A capped batch's running spend, added to in the transaction that books each attempt.
ADD_BATCH_SPEND = (
    update(Batch)
    .where(Batch.id == _p("p_batch", _batch.id))
    .values(spent_usd=Batch.spent_usd + _p("p_cost", _batch.spent_usd))
)
# The rare path of a claim that found nothing to run: was it the job's batch, cancelled
# or at its spend cap?
BATCH_STOP_OF_JOB = select(_batch.spend_cap_usd, _batch.spent_usd, _batch.cancelled_at).where(
    _batch.id == select(Job.batch_id).where(Job.id == _p("p_id")).scalar_subquery(),
    or_(_batch.spend_cap_usd.is_not(None), _batch.cancelled_at.is_not(None)),
)
# A job of a cancelled batch that a claim would have run, triaged or taken over from a
# lost worker (`lost_leased_at` back non-null: record its lost call), is cancelled.
CANCEL_WITH_BATCH = (
    update(Job)
    .where(_ON_TIER, or_(Job.status == JobStatus.TRIAGED, _LEASE_LAPSED), _CANCELLED)
    .values(
        status=JobStatus.CANCELLED,
        error=_p("p_error", _job.error),
        finished_at=func.now(),
        lease_until=None,
        lost_leased_at=_LOST_SINCE,
        hold_reason=None,
    )
    .returning(Job.feature, Job.created_at, Job.attempt_count, Job.lost_leased_at)
)
CANCEL_OVER_CAP = (
    update(Job)
    .where(
        Job.id == _p("p_id"),
        Job.tier == _p("p_tier", _job.tier),
        Job.status == JobStatus.TRIAGED,
        _CAP_REACHED,
    )
    .values(status=JobStatus.CANCELLED, error=_p("p_error", _job.error), finished_at=func.now())
    .returning(Job.feature, Job.created_at)
)
# A job waiting for a daily budget: why, on the row (`updated_at` too: the wait is
# activity, and its delayed message is held by a worker, so the reconciler leaves it).
HOLD = (
    update(Job)
    .where(
        Job.id == _p("p_id"), Job.tier == _p("p_tier", _job.tier), Job.status == JobStatus.TRIAGED
    )
    .values(hold_reason=_p("p_reason", _job.hold_reason), updated_at=func.now())
    .returning(Job.id)
)
# A claim whose commit lost its reply: the job as that claim left it (read on a retry
# only; `leased_at` is the claim's own clock reading).
CLAIMED_AT = select(
    Job.feature, Job.route, Job.latency, Job.payload, Job.attempt_count, Job.attempt_floor,
    Job.created_at, Job.triage_score, Job.batch_id,
    select(_batch.spend_cap_usd).where(_batch.id == Job.batch_id).scalar_subquery()
    .label("spend_cap_usd"),
).where(
    Job.id == _p("p_id"),
    Job.tier == _p("p_tier", _job.tier),
    Job.status == _RUNNING,
    Job.leased_at == _p("p_now", _job.leased_at),
)  # fmt: skip
# A job whose `max_tokens` asks for a longer call than the claim's default lease.
EXTEND_LEASE = (
    update(Job)
    .where(Job.id == _p("p_id"), Job.attempt_count == _p("p_seq", _job.attempt_count))
    .values(lease_until=_p("p_until", _job.lease_until))
)

INSERT_ATTEMPT = insert(Attempt)
# A batch-mode attempt, collected for the next provider batch of its tier.
COLLECT = insert(BatchRequest)
# Did a booking whose commit lost its reply land? (read on a retry only)
ATTEMPT_BOOKED = select(Attempt.outcome, Attempt.started_at).where(Attempt.id == _p("p_id"))
INSERT_DEAD_LETTER = insert(DeadLetter)

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
    """Book an attempt on the job and apply the decision, if the job is still running
    under this attempt's lease (`attempt_count` is its seq). None back: the lease lapsed
    and another worker has the job; this attempt is recorded, not applied."""
    return (
        update(Job)
        .where(
            Job.id == _p("p_id"),
            Job.status == _RUNNING,
            Job.attempt_count == _p("p_seq", _job.attempt_count),
        )
        .values(cost_usd=Job.cost_usd + _p("p_cost", _job.cost_usd), lease_until=None, **changes)
        .returning(Job.id)
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

# The attempt's row, as `booking` inserts it: every column but the server-stamped one.
ATTEMPT_COLUMNS = tuple(c for c in Attempt.__table__.c if c.name != "created_at")


def booking(record: Any) -> Any:
    """`record` and the attempt's INSERT as one statement (PostgreSQL): the row goes in
    only when the record applied, so a row back means both happened and none means
    neither did. One round trip where there were two, on every attempt. The row's values
    are bound as `a_<column>` (a parameter named like a `jobs` column would become a SET
    of the UPDATE)."""
    applied = record.cte("applied")
    values = select(*(_p(f"a_{c.name}", c) for c in ATTEMPT_COLUMNS)).select_from(applied)
    return insert(Attempt).from_select(ATTEMPT_COLUMNS, values).returning(Attempt.id)


BOOKING = {
    record: booking(record)
    for record in (RECORD_SUCCEEDED, RECORD_FAILED, RECORD_ESCALATED, RECORD_RETRY)
}

# The rare paths: an attempt that outlived its lease, a job given up on.
ADD_COST = (
    update(Job)
    .where(Job.id == _p("p_id"))
    .values(cost_usd=Job.cost_usd + _p("p_cost", _job.cost_usd))
)
# Did the small tier fail this job before it reached the frontier? (the router's label)
# The tiers a job's answers climbed from in this run (escalating outcomes past the floor).
CLIMBED_FROM = (
    select(Attempt.tier)
    .where(
        Attempt.job_id == _p("p_id"),
        Attempt.seq > _p("p_floor", Attempt.__table__.c.seq),
        Attempt.outcome.in_(list(ESCALATING_OUTCOMES)),
    )
    .distinct()
)
COUNT_ABANDONED = select(func.count()).where(
    Attempt.job_id == _p("p_id"),
    Attempt.seq > _p("p_floor", Attempt.__table__.c.seq),
    Attempt.outcome == Outcome.ABANDONED,
)
FAIL_UNFINISHED = (
    update(Job)
    .where(Job.id == _p("p_id"), Job.status.not_in(list(TERMINAL_STATUSES)))
    .values(
        status=JobStatus.FAILED,
        error=_p("p_error", _job.error),
        finished_at=func.now(),
        lease_until=None,
    )
    .returning(Job.id, Job.feature, Job.tier, Job.created_at)
)


def insert_attempt_once(dialect: str) -> Any:
    """INSERT an attempt unless its id is there (abandoned attempts: whoever of the lost
    worker and its successor records it first)."""
    ins = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return ins(Attempt).on_conflict_do_nothing(index_elements=["id"])


def upsert_abandoned(dialect: str) -> Any:
    """An attempt that finished after its lease lapsed: recorded as abandoned with what
    its call really used, and when it really started (the successor may have recorded
    the row already, usage unknown)."""
    ins = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = ins(Attempt)
    usage = (
        "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
        "latency_ms", "cost_usd", "mean_logprob", "finish_reason", "error", "started_at",
        "provider_batch_id",
    )  # fmt: skip
    return stmt.on_conflict_do_update(
        index_elements=["id"], set_={name: stmt.excluded[name] for name in usage}
    )


# Daily budgets (`workers/budgets.py`): the caps, and today's spend of some scopes.
BUDGET_CAPS = select(Budget.scope, Budget.daily_cap_usd)
BUDGET_SPEND = select(BudgetSpend.scope, BudgetSpend.spent_usd).where(
    BudgetSpend.day == bindparam("p_day"),
    BudgetSpend.scope.in_(bindparam("p_scopes", expanding=True)),
)


# Message Batches (`workers/message_batches.py`): the collected requests with their jobs,
# as a claim returns them (`execute._claimed` reads either).
_br = BatchRequest.__table__.c
_REQUEST_AND_JOB = (
    _br.id, _br.job_id, _br.seq, _br.collected_at, Job.feature, Job.route, Job.latency,
    Job.payload, Job.attempt_count, Job.attempt_floor, Job.created_at, Job.triage_score,
    Job.batch_id,
    select(_batch.spend_cap_usd).where(_batch.id == Job.batch_id).scalar_subquery()
    .label("spend_cap_usd"),
)  # fmt: skip
_STILL_WAITING = and_(Job.status == _RUNNING, Job.attempt_count == _br.seq)
# A tier's requests waiting for a provider batch, oldest first; locked, skipping what
# another submitter holds.
WAITING = (
    select(*_REQUEST_AND_JOB)
    .join(Job, Job.id == _br.job_id)
    .where(_br.batch_id.is_(None), _br.tier == _p("p_tier"), _STILL_WAITING)
    .order_by(_br.collected_at)
    .limit(bindparam("p_limit"))
    .with_for_update(of=BatchRequest, skip_locked=True)
)
# Requests waiting for a provider batch, per tier.
WAITING_COUNT = (
    select(_br.tier, func.count())
    .select_from(BatchRequest)
    .join(Job, Job.id == _br.job_id)
    .where(_br.batch_id.is_(None), _STILL_WAITING)
    .group_by(_br.tier)
)
BATCH_REQUESTS_OF = (
    select(*_REQUEST_AND_JOB).join(Job, Job.id == _br.job_id).where(_br.batch_id == _p("p_batch"))
)
BATCH_REQUESTS_BY_ID = (
    select(*_REQUEST_AND_JOB)
    .join(Job, Job.id == _br.job_id)
    .where(_br.id.in_(bindparam("p_ids", expanding=True)))
)
ASSIGN_REQUESTS = (
    update(BatchRequest)
    .where(_br.id.in_(bindparam("p_ids", expanding=True)))
    .values(batch_id=_p("p_batch"))
)
BOOKED_AMONG = select(Attempt.id).where(Attempt.id.in_(bindparam("p_ids", expanding=True)))
# A request of the batch that has no attempt row yet: the provider sent no result for it.
UNBOOKED_OF = (
    select(*_REQUEST_AND_JOB)
    .join(Job, Job.id == _br.job_id)
    .where(
        _br.batch_id == _p("p_batch"),
        ~select(Attempt.id).where(Attempt.id == _br.id).exists(),
    )
)
# Collected requests whose job has moved on (taken over after a lapsed lease, failed by
# hand): never sent.
DROP_STALE_WAITING = (
    delete(BatchRequest)
    .where(_br.batch_id.is_(None), _br.collected_at < _p("p_before", _br.collected_at))
    .where(~select(Job.id).where(Job.id == _br.job_id, _STILL_WAITING).exists())
)
