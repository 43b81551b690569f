"""The two steps of a job's life in a worker: triage it, and run one attempt on a tier.

Each step reads what it needs by primary key, does its work, writes the outcome in one
transaction, and only then says what message comes next. Steps are idempotent: a message
for a job that has moved on (terminal, or escalated past this tier) does nothing. This is
the per-job hot path: prebuilt Core statements (`workers/sql.py`), no ORM unit of work.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from tierfleet.constants import JobStatus, Outcome
from tierfleet.envelope import JobSpec
from tierfleet.errors import (
    InvalidOutput,
    PermanentError,
    ProviderTimeout,
    RetryableError,
)
from tierfleet.prices import Usage
from workers import sql
from workers.policy import Action, Decision
from workers.runtime import Runtime
from workers.validation import LOW_CONFIDENCE_RULE, validate

log = logging.getLogger("tierfleet.worker")

_ANSWERED = (Outcome.SUCCEEDED, Outcome.INVALID, Outcome.LOW_CONFIDENCE)
_TRANSIENT = (Outcome.ERROR, Outcome.TIMEOUT)


@dataclass(frozen=True, slots=True)
class Next:
    """The message to send once the step's transaction has committed."""

    tier: str
    delay_s: float = 0.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def triage_job(rt: Runtime, job_id: str) -> Next | None:
    with rt.ledger.begin() as conn:
        row = conn.execute(sql.TRIAGE_READ, {"p_id": job_id}).one_or_none()
        if row is None:
            log.warning("job not found", extra={"action": "triage.missing", "job_id": job_id})
            return None
        if row.status != JobStatus.QUEUED:
            return None  # already triaged: a duplicate message
        spec = JobSpec.from_row(
            id=job_id,
            feature=row.feature,
            route=row.route,
            latency=row.latency,
            payload=row.payload,
        )
        decision = rt.triage.decide(spec)
        moved = conn.execute(
            sql.TRIAGE_WRITE,
            {
                "p_id": job_id,
                "p_tier": decision.tier,
                "p_score": decision.score,
                "p_reason": decision.reason,
                "p_version": decision.version,
            },
        ).scalar_one_or_none()
    if moved is None:
        return None
    log.info(
        "triaged",
        extra={
            "action": "triage.done",
            "job_id": job_id,
            "tier": decision.tier,
            "feature": spec.feature,
            "reason": decision.reason,
        },
    )
    return Next(decision.tier)


def triage_range(rt: Runtime, batch_id: str, first: int, last: int) -> list[tuple[str, Next]]:
    """Triage a bulk chunk: the batch's jobs on lines `first`..`last` still queued."""
    decided: list[tuple[str, Next]] = []
    params: list[dict[str, Any]] = []
    with rt.ledger.begin() as conn:
        rows = conn.execute(sql.RANGE_READ, {"p_batch": batch_id, "p_first": first, "p_last": last})
        for row in rows:
            spec = JobSpec.from_row(
                id=row.id, feature=row.feature, route=row.route, latency=row.latency,
                payload=row.payload,
            )  # fmt: skip
            decision = rt.triage.decide(spec)
            params.append(
                {
                    "p_id": row.id,
                    "p_tier": decision.tier,
                    "p_score": decision.score,
                    "p_reason": decision.reason,
                    "p_version": decision.version,
                }
            )
            decided.append((row.id, Next(decision.tier)))
        if params:
            conn.execute(sql.TRIAGE_WRITE_MANY, params)
    log.info(
        "triaged a chunk",
        extra={"action": "triage.range", "batch_id": batch_id, "lines": f"{first}-{last}",
               "jobs": len(decided)},
    )  # fmt: skip
    return decided


@dataclass(frozen=True, slots=True)
class _Claimed:
    spec: JobSpec
    seq: int
    floor: int  # attempts up to this seq belong to an earlier run (see `tierfleet retry`)
    created_at: dt.datetime


def _claim(rt: Runtime, job_id: str, tier: str) -> _Claimed | None:
    """Mark the job running on `tier`; None when the job moved on."""
    with rt.ledger.begin() as conn:
        row = conn.execute(sql.CLAIM, {"p_id": job_id, "p_tier": tier}).one_or_none()
    if row is None:
        return None
    spec = JobSpec.from_row(
        id=job_id, feature=row.feature, route=row.route, latency=row.latency, payload=row.payload
    )
    return _Claimed(spec, row.attempt_count + 1, row.attempt_floor, row.created_at)


@dataclass(frozen=True, slots=True)
class CallResult:
    """What one model call came to, validated."""

    outcome: Outcome
    usage: Usage = field(default_factory=Usage)
    result: Any = None
    error: str = ""
    finish_reason: str | None = None
    mean_logprob: float | None = None
    retry_after_s: float | None = None


def _call(rt: Runtime, spec: JobSpec, tier: str) -> CallResult:
    """Call the tier's model and validate its answer. Never raises: every fault becomes
    an outcome, so that every call leaves an attempt row behind."""
    backend = rt.backends[tier]
    is_top = tier == rt.policy.ladder[-1]
    timeout_s = (
        rt.settings.frontier_timeout_s if is_top else rt.settings.slm_timeout_s(spec.max_tokens)
    )
    try:
        completion = backend.complete(spec, timeout_s=timeout_s)
    except ProviderTimeout as exc:
        return CallResult(Outcome.TIMEOUT, error=str(exc), retry_after_s=exc.retry_after_s)
    except RetryableError as exc:
        return CallResult(Outcome.ERROR, error=str(exc), retry_after_s=exc.retry_after_s)
    except PermanentError as exc:
        return CallResult(Outcome.FAILED, error=str(exc))
    except Exception as exc:  # a backend bug must not strand the job
        log.exception(
            "backend raised",
            extra={"action": "attempt.backend_error", "job_id": spec.id, "tier": tier},
        )
        return CallResult(Outcome.FAILED, error=f"{type(exc).__name__}: {exc}")

    answered = CallResult(
        Outcome.SUCCEEDED,
        usage=completion.usage,
        finish_reason=completion.finish_reason,
        mean_logprob=completion.mean_logprob,
    )
    try:
        result = validate(
            completion,
            spec.output_schema,
            min_mean_logprob=None if is_top else rt.settings.min_mean_logprob,
        )
    except InvalidOutput as exc:
        outcome = Outcome.LOW_CONFIDENCE if exc.rule == LOW_CONFIDENCE_RULE else Outcome.INVALID
        return dataclasses.replace(answered, outcome=outcome, error=str(exc))
    return dataclasses.replace(answered, result=result)


def attempt_job(rt: Runtime, job_id: str, tier: str) -> Next | None:
    claimed = _claim(rt, job_id, tier)
    if claimed is None:
        return None
    spec = claimed.spec
    backend = rt.backends[tier]
    started_at = _now()
    t0 = time.perf_counter()
    call = _call(rt, spec, tier)
    latency_ms = round((time.perf_counter() - t0) * 1000)
    usage, outcome = call.usage, call.outcome
    cost = rt.prices[backend.model].cost_usd(usage)

    with rt.ledger.begin() as conn:
        decision = _decide(rt, conn, job_id, tier, call, claimed.floor)
        conn.execute(
            sql.INSERT_ATTEMPT,
            {
                "id": str(uuid.uuid4()),
                "job_id": job_id,
                "seq": claimed.seq,
                "tier": tier,
                "model": backend.model,
                "provider": backend.provider,
                "outcome": outcome,
                "error": call.error or None,
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cache_read_tokens": usage.cache_read_tokens,
                "cache_write_tokens": usage.cache_write_tokens,
                "latency_ms": latency_ms,
                "cost_usd": cost,
                "mean_logprob": call.mean_logprob,
                "finish_reason": call.finish_reason,
                "feature": spec.feature,
                "started_at": started_at,
            },
        )
        statement, params = _record(decision, call.result)
        conn.execute(statement, {"p_id": job_id, "p_cost": cost, **params})

    rt.metrics.attempt(
        tier=tier,
        model=backend.model,
        provider=backend.provider,
        feature=spec.feature,
        outcome=outcome.value,
        usage=usage,
        cost_usd=cost,
        latency_ms=latency_ms,
    )
    log.info(
        "attempt",
        extra={
            "action": "attempt.done",
            "job_id": job_id,
            "tier": tier,
            "feature": spec.feature,
            "outcome": outcome.value,
            "decision": decision.action.value,
        },
    )
    return _follow(rt, spec, tier, outcome, decision, claimed.created_at)


def _decide(
    rt: Runtime, conn: Connection, job_id: str, tier: str, call: CallResult, floor: int
) -> Decision:
    """Ask the policy; the counts it needs come from this job's earlier attempts on `tier`
    (the success path needs none and reads none)."""
    if call.outcome is Outcome.SUCCEEDED:
        return Decision(Action.SUCCEED)
    rows = conn.execute(sql.OUTCOME_COUNTS, {"p_id": job_id, "p_tier": tier, "p_floor": floor})
    counts = {outcome: n for outcome, n in rows}
    return rt.policy.decide(
        tier=tier,
        outcome=call.outcome,
        reason=call.error,
        answers_on_tier=1 + sum(counts.get(o, 0) for o in _ANSWERED),
        transient_retries=sum(counts.get(o, 0) for o in _TRANSIENT),
        retry_after_s=call.retry_after_s,
    )


def _record(decision: Decision, result: Any) -> tuple[Any, dict[str, Any]]:
    """The statement that books the attempt on the job, and its parameters."""
    if decision.action is Action.SUCCEED:
        return sql.RECORD_SUCCEEDED, {"p_result": result}
    if decision.action is Action.FAIL:
        return sql.RECORD_FAILED, {"p_error": decision.reason}
    if decision.action is Action.ESCALATE:
        return sql.RECORD_ESCALATED, {"p_tier": decision.next_tier}
    return sql.RECORD_RETRY, {}


def _follow(
    rt: Runtime,
    spec: JobSpec,
    tier: str,
    outcome: Outcome,
    decision: Decision,
    created_at: dt.datetime,
) -> Next | None:
    if decision.action is Action.RETRY:
        return Next(tier, decision.delay_s)
    if decision.action is Action.ESCALATE:
        assert decision.next_tier is not None
        rt.metrics.escalation(
            from_tier=tier,
            to_tier=decision.next_tier,
            feature=spec.feature,
            reason=outcome.value,
        )
        return Next(decision.next_tier)
    status = "succeeded" if decision.action is Action.SUCCEED else "failed"
    duration_ms = _duration_ms(created_at)
    rt.metrics.job_finished(tier=tier, feature=spec.feature, status=status, duration_ms=duration_ms)
    return None


def _duration_ms(created_at: dt.datetime) -> int:
    if created_at.tzinfo is None:  # SQLite hands back naive UTC
        created_at = created_at.replace(tzinfo=dt.UTC)
    return max(0, round((_now() - created_at).total_seconds() * 1000))
