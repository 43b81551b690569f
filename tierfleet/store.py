"""Ledger operations both sides share: insert a job, read a job with its attempts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from tierfleet.constants import JobStatus
from tierfleet.envelope import JobSpec
from tierfleet.errors import JobNotFound
from tierfleet.models import Attempt, Job


def insert_job(
    session: Session,
    spec: JobSpec,
    *,
    batch_id: str | None = None,
    payload_json: bytes | None = None,
    team: str | None = None,
) -> tuple[str, bool]:
    """Insert `spec` as a queued job. Returns (job id, created); a job that already exists
    with the same idempotency key (or id) is returned with created=False. `payload_json`
    is `spec.payload_json()` when the caller has it already: stored as is, not
    serialised again."""
    payload = spec.payload() if payload_json is None else orjson.Fragment(payload_json)
    values = {
        "id": spec.id,
        "idempotency_key": spec.idempotency_key,
        "batch_id": batch_id,
        "feature": spec.feature,
        "status": JobStatus.QUEUED,
        "route": spec.route,
        "latency": spec.latency,
        "payload": payload,
        "cost_usd": Decimal(0),
        "attempt_count": 0,
        "team": team,
    }
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(Job).values(**values).on_conflict_do_nothing().returning(Job.id)
    created = session.execute(stmt).scalar_one_or_none()
    if created is not None:
        return created, True
    conditions = [Job.id == spec.id]
    if spec.idempotency_key is not None:
        conditions.append(Job.idempotency_key == spec.idempotency_key)
    existing = session.execute(select(Job.id).where(or_(*conditions))).scalars().first()
    if existing is None:  # pragma: no cover - a concurrent delete between the two statements
        raise JobNotFound(f"job {spec.id} vanished while being submitted")
    return existing, False


def job_status(session: Session, job_id: str) -> JobStatus | None:
    status = session.execute(select(Job.status).where(Job.id == job_id)).scalar_one_or_none()
    return None if status is None else JobStatus(status)


@dataclass(frozen=True, slots=True)
class AttemptView:
    id: str
    seq: int
    tier: str
    model: str
    provider: str
    outcome: str
    error: str | None
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    latency_ms: int
    cost_usd: Decimal
    mean_logprob: float | None = None
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class JobView:
    """What `Client.get()` and `tierfleet job get` show of a job."""

    id: str
    status: JobStatus
    feature: str
    tier: str | None
    triage_reason: str | None
    triage_score: float | None
    result: Any
    error: str | None
    cost_usd: Decimal
    attempts: tuple[AttemptView, ...]
    hold_reason: str | None = None  # why it waits (a daily budget spent), while it does
    team: str | None = None  # whose API token submitted it

    @property
    def terminal(self) -> bool:
        return self.status.terminal

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        data["cost_usd"] = str(self.cost_usd)
        data["attempts"] = [{**a, "cost_usd": str(a["cost_usd"])} for a in data["attempts"]]
        return data


def get_job(session: Session, job_id: str) -> JobView:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(f"no job with id {job_id!r}")
    rows = session.execute(
        select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.seq)
    ).scalars()
    attempts = tuple(
        AttemptView(
            id=a.id,
            seq=a.seq,
            tier=a.tier,
            model=a.model,
            provider=a.provider,
            outcome=a.outcome.value,
            error=a.error,
            input_tokens=a.input_tokens,
            output_tokens=a.output_tokens,
            cache_read_tokens=a.cache_read_tokens,
            cache_write_tokens=a.cache_write_tokens,
            latency_ms=a.latency_ms,
            cost_usd=a.cost_usd,
            mean_logprob=a.mean_logprob,
            finish_reason=a.finish_reason,
        )
        for a in rows
    )
    return JobView(
        id=job.id,
        status=JobStatus(job.status),
        feature=job.feature,
        tier=job.tier,
        triage_reason=job.triage_reason,
        triage_score=job.triage_score,
        result=job.result,
        error=job.error,
        cost_usd=job.cost_usd,
        attempts=attempts,
        hold_reason=job.hold_reason,
        team=job.team,
    )
