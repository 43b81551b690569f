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
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import orjson
import redis
from sqlalchemy import Connection
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from tierfleet import constants as C
from tierfleet.constants import JobStatus, Outcome
from tierfleet.db import ledger_unavailable, utc
from tierfleet.envelope import DEFAULT_MAX_TOKENS, JobSpec
from tierfleet.errors import (
    InvalidOutput,
    PermanentError,
    ProviderTimeout,
    RequestNotRun,
    RetryableError,
    TierfleetError,
)
from tierfleet.prices import Usage
from workers import sql, storable
from workers.backends.base import BatchBackend, Completion
from workers.budgets import Hold
from workers.policy import Action, Decision
from workers.router.router import LearnedRouter
from workers.runtime import Runtime
from workers.validation import LOW_CONFIDENCE_RULE, validate

log = logging.getLogger("tierfleet.worker")

_T = TypeVar("_T")

_MAX_BODY_CHARS = 64_000
_ANSWERED = (Outcome.SUCCEEDED, Outcome.INVALID, Outcome.LOW_CONFIDENCE)
_TRANSIENT = (Outcome.ERROR, Outcome.TIMEOUT)
_NOT_RUN = (Outcome.EXPIRED, Outcome.CANCELED)


@dataclass(frozen=True, slots=True)
class Next:
    """The message to send once the step's transaction has committed."""

    tier: str
    delay_s: float = 0.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


TRIAGE_REASON_CHARS = 200  # the ledger's jobs.triage_reason


def _reason(text: str) -> str:
    """A triage reason as the ledger holds it (a ladder's names every rung's score)."""
    return text if len(text) <= TRIAGE_REASON_CHARS else text[: TRIAGE_REASON_CHARS - 1] + "…"


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
                "p_reason": _reason(decision.reason),
                "p_version": decision.version,
            },
        ).scalar_one_or_none()
    if moved is None:
        return None
    log.debug(
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


def triage_range(
    rt: Runtime, batch_id: str, first: int, last: int
) -> tuple[list[tuple[str, Next]], list[str]]:
    """Triage a bulk chunk: the batch's jobs on lines `first`..`last` still queued.
    Returns the decisions, and the jobs that could not be triaged here (their payload or
    scorer raised): those go on as messages of their own, so that one bad job is retried
    and, if need be, dead-lettered alone, not with its chunk."""
    decided: list[tuple[str, Next]] = []
    params: list[dict[str, Any]] = []
    alone: list[str] = []
    with rt.ledger.begin() as conn:
        rows = conn.execute(sql.RANGE_READ, {"p_batch": batch_id, "p_first": first, "p_last": last})
        for row in rows:
            try:
                spec = JobSpec.from_row(
                    id=row.id, feature=row.feature, route=row.route, latency=row.latency,
                    payload=row.payload,
                )  # fmt: skip
                decision = rt.triage.decide(spec)
            except Exception:
                log.exception(
                    "cannot triage a job of a chunk; it goes on alone",
                    extra={"action": "triage.range_error", "job_id": row.id},
                )
                alone.append(row.id)
                continue
            params.append(
                {
                    "p_id": row.id,
                    "p_tier": decision.tier,
                    "p_score": decision.score,
                    "p_reason": _reason(decision.reason),
                    "p_version": decision.version,
                }
            )
            decided.append((row.id, Next(decision.tier)))
        if params:
            conn.execute(sql.TRIAGE_WRITE_MANY, params)
    log.debug(
        "triaged a chunk",
        extra={"action": "triage.range", "batch_id": batch_id, "lines": f"{first}-{last}",
               "jobs": len(decided)},
    )  # fmt: skip
    return decided, alone


def attempt_id(job_id: str, seq: int) -> str:
    """An attempt's id follows from its job and seq: whoever records it (its worker, or
    the successor that took the job over) writes the same row."""
    return str(uuid.uuid5(C.ATTEMPT_ID_NAMESPACE, f"{job_id}/{seq}"))


def _timeout_s(rt: Runtime, tier: str, max_tokens: int) -> float:
    return rt.settings.fleet.tier(tier).timeout_for(max_tokens)


@dataclass(frozen=True, slots=True)
class _Claimed:
    spec: JobSpec
    seq: int  # this attempt's; the job's `attempt_count` while it holds the lease
    floor: int  # attempts up to this seq belong to an earlier run (see `tierfleet retry`)
    created_at: dt.datetime
    capped_batch: str | None = None  # its batch, when that has a spend cap to keep
    triage_score: float | None = None
    collected: bool = False  # for a provider batch: no call now


def batching(rt: Runtime, tier: str, spec: JobSpec) -> bool:
    """Does this attempt go out in a provider batch (half price) instead of a call?"""
    return spec.latency == C.LATENCY_BATCH and _may_batch(rt, tier)


def _may_batch(rt: Runtime, tier: str) -> bool:
    return (
        rt.settings.message_batches != "off"
        and rt.settings.fleet.tier(tier).batch
        and isinstance(rt.backends.get(tier), BatchBackend)
    )


def _claim(rt: Runtime, job_id: str, tier: str) -> _Claimed | None:
    """Lease the job for a call on `tier`; None when the job moved on, or is running
    under another worker's live lease. The lease lasts the call's timeout plus a grace.
    A ledger outage is waited out here; a claim whose commit landed but whose reply the
    outage cut off is found again by its clock reading, not taken for another worker's."""
    now = _now()
    tries = 0

    def claim() -> _Claimed | None:
        nonlocal tries
        tries += 1
        return _claim_once(rt, job_id, tier, now, again=tries > 1)

    return _with_ledger_retry(rt, job_id, claim)


def _claim_once(
    rt: Runtime, job_id: str, tier: str, now: dt.datetime, *, again: bool
) -> _Claimed | None:
    lease_s = _timeout_s(rt, tier, DEFAULT_MAX_TOKENS) + rt.settings.lease_grace_s
    params = {"p_id": job_id, "p_tier": tier, "p_now": now, "p_until": now + _s(lease_s)}
    if not again:
        fast = _claim_triaged(rt, tier, params, lease_s)
        if fast is not None:
            return fast
    with rt.ledger.begin() as conn:
        row = conn.execute(sql.CLAIM, params).one_or_none()
        if row is None and again:
            # the earlier try's transaction did all the rest (hold check, take-over)
            landed = conn.execute(
                sql.CLAIMED_AT, {"p_id": job_id, "p_tier": tier, "p_now": now}
            ).one_or_none()
            if landed is None:
                return None
            claimed = _claimed(job_id, landed)
            return dataclasses.replace(claimed, collected=batching(rt, tier, claimed.spec))
        if row is None:
            _stop_batch(rt, conn, job_id, tier, now)
            return None
        hold = rt.budgets.hold(conn, row.feature, tier)
        if hold is not None:
            raise _OnHold(hold)  # the claim rolls back: the job stays triaged
        claimed = _claimed(job_id, row)
        need_s = _timeout_s(rt, tier, claimed.spec.max_tokens) + rt.settings.lease_grace_s
        if need_s > lease_s:
            conn.execute(
                sql.EXTEND_LEASE,
                {"p_id": job_id, "p_seq": claimed.seq, "p_until": now + _s(need_s)},
            )
        if row.lost_leased_at is not None and not _take_over(
            rt, conn, claimed, tier, row.lost_leased_at
        ):
            return None
        if batching(rt, tier, claimed.spec):
            until = now + _s(rt.settings.batch_lease_s)
            conn.execute(sql.EXTEND_LEASE, {"p_id": job_id, "p_seq": claimed.seq, "p_until": until})
            conn.execute(
                sql.COLLECT,
                {"id": attempt_id(job_id, claimed.seq), "job_id": job_id, "seq": claimed.seq,
                 "tier": tier, "collected_at": now},
            )  # fmt: skip
            return dataclasses.replace(claimed, collected=True)
    return claimed


def _claim_triaged(
    rt: Runtime, tier: str, params: dict[str, Any], lease_s: float
) -> _Claimed | None:
    """The common claim in one statement, committed on its own: a triaged job, on a tier
    where no budget can hold it and no provider batch collects it. None: not that case;
    the full claim decides (a take-over, a duplicate message, a spent cap)."""
    with rt.ledger.autocommit() as conn:
        if rt.budgets.may_hold(conn, tier) or _may_batch(rt, tier):
            return None
        row = conn.execute(sql.CLAIM_TRIAGED, params).one_or_none()
        if row is None:
            return None
        claimed = _claimed(params["p_id"], row)
        need_s = _timeout_s(rt, tier, claimed.spec.max_tokens) + rt.settings.lease_grace_s
        if need_s > lease_s:  # a lease a moment short if this worker dies now: harmless
            until = params["p_now"] + _s(need_s)
            conn.execute(
                sql.EXTEND_LEASE, {"p_id": params["p_id"], "p_seq": claimed.seq, "p_until": until}
            )
    return claimed


def _claimed(job_id: str, row: Any) -> _Claimed:
    spec = JobSpec.from_row(
        id=job_id, feature=row.feature, route=row.route, latency=row.latency,
        payload=row.payload,
    )  # fmt: skip
    capped = row.batch_id if row.spend_cap_usd is not None else None
    return _Claimed(
        spec, row.attempt_count, row.attempt_floor, row.created_at, capped, row.triage_score
    )


class _OnHold(Exception):
    def __init__(self, hold: Hold) -> None:
        self.hold = hold


def _hold(rt: Runtime, job_id: str, tier: str, hold: Hold) -> Next | None:
    """A daily budget is spent: the job waits, its reason on the row, and its message
    comes back after `hold.delay_s` to look again."""
    with rt.ledger.begin() as conn:
        waiting = conn.execute(
            sql.HOLD, {"p_id": job_id, "p_tier": tier, "p_reason": hold.reason}
        ).first()
    if waiting is None:
        return None
    log.info(
        "budget spent; the job waits",
        extra={"action": "attempt.budget_hold", "job_id": job_id, "tier": tier},
    )
    return Next(tier, hold.delay_s)


def _stop_batch(rt: Runtime, conn: Connection, job_id: str, tier: str, now: dt.datetime) -> None:
    """A claim found nothing to run. When that is because the job's batch was cancelled,
    or has spent its cap, the job is cancelled with the reason, instead of waiting for a
    call that never comes (taken from a lost worker, its lost call is recorded, as a
    take-over records it). Otherwise the job moved on, and the message was a duplicate."""
    batch = conn.execute(sql.BATCH_STOP_OF_JOB, {"p_id": job_id}).first()
    params: dict[str, Any] = {"p_id": job_id, "p_tier": tier}
    row: Any
    if batch is not None and batch.cancelled_at is not None:
        when = f"{utc(batch.cancelled_at):%Y-%m-%d %H:%M:%S} UTC"
        error = f"cancelled: its batch was cancelled at {when}; no new call starts"
        stopped = conn.execute(sql.CANCEL_WITH_BATCH, {**params, "p_now": now, "p_error": error})
        row, action = stopped.first(), "attempt.batch_cancelled"
        if row is not None and row.lost_leased_at is not None:
            _record_lost(rt, conn, job_id, row.attempt_count, tier, row.feature, row.lost_leased_at)
    elif batch is not None and batch.spend_cap_usd is not None:
        if batch.spent_usd < batch.spend_cap_usd:
            return
        error = (
            f"cancelled: its batch reached its spend cap (spent ${_usd(batch.spent_usd)} of "
            f"${_usd(batch.spend_cap_usd)}); no new call starts"
        )
        row = conn.execute(sql.CANCEL_OVER_CAP, {**params, "p_error": error}).first()
        action = "attempt.over_cap"
    else:
        return
    if row is not None:
        rt.metrics.job_finished(
            tier=tier, feature=row.feature, status=JobStatus.CANCELLED.value,
            duration_ms=_duration_ms(row.created_at),
        )  # fmt: skip
        log.info(
            "no new call for its batch; job cancelled",
            extra={"action": action, "job_id": job_id, "tier": tier},
        )


def _usd(amount: Decimal) -> str:
    """Dollars to the cent, and to the last significant digit below it: `2.00`, `0.0013`."""
    whole, _, cents = f"{amount:.8f}".rstrip("0").partition(".")
    return f"{whole}.{cents.ljust(2, '0')}"


def _take_over(
    rt: Runtime, conn: Connection, claimed: _Claimed, tier: str, lost_since: dt.datetime
) -> bool:
    """The job's last worker was lost mid-call: its attempt is recorded as abandoned
    (usage unknown: no answer came back). After `max_worker_losses` such losses the job
    is dead-lettered instead of run again: it may be what crashes its workers."""
    job_id, spec = claimed.spec.id, claimed.spec
    _record_lost(rt, conn, job_id, claimed.seq - 1, tier, spec.feature, lost_since)
    losses = conn.execute(sql.COUNT_ABANDONED, {"p_id": job_id, "p_floor": claimed.floor})
    lost = int(losses.scalar_one())
    log.warning(
        "took over a job whose worker was lost",
        extra={"action": "attempt.take_over", "job_id": job_id, "tier": tier, "losses": lost},
    )
    if lost < rt.settings.max_worker_losses:
        return True
    error = (
        f"dead letter: its worker was lost {lost} times while running it "
        "(a job that crashes its worker?)"
    )
    dead_letter(
        rt, conn, job_id=job_id, task=C.TASK_ATTEMPT, queue=rt.settings.queue_for(tier),
        reason="worker_lost", tries=lost, error=error, body=[job_id, tier],
    )  # fmt: skip
    return False


def _record_lost(
    rt: Runtime,
    conn: Connection,
    job_id: str,
    seq: int,
    tier: str,
    feature: str,
    lost_since: dt.datetime,
) -> None:
    """The attempt of a worker lost mid-call, as abandoned: no answer came back (if it
    comes after all, its booking fills in the usage and cost)."""
    conn.execute(
        sql.insert_attempt_once(conn.dialect.name),
        _attempt_row(
            job_id, seq, tier, rt.backends[tier], feature, CallResult(Outcome.ABANDONED,
            error="its worker was lost mid-call (the lease lapsed); usage unknown"),
            cost=Decimal(0), latency_ms=_ms_since(lost_since), started_at=lost_since,
        ),
    )  # fmt: skip


def dead_letter(
    rt: Runtime,
    conn: Connection,
    *,
    job_id: str | None,
    task: str | None,
    queue: str | None,
    reason: str,
    tries: int,
    error: str,
    traceback: str | None = None,
    body: Any = None,
) -> None:
    """Give up on a message: its job (if any, and unfinished) fails with `error`, and a
    dead-letter row keeps the error, traceback and body for a person to look at."""
    if job_id is not None:
        failed = conn.execute(sql.FAIL_UNFINISHED, {"p_id": job_id, "p_error": error}).first()
        if failed is not None:
            rt.metrics.job_finished(
                tier=failed.tier or "none", feature=failed.feature, status="failed",
                duration_ms=_duration_ms(failed.created_at),
            )  # fmt: skip
    text = body if isinstance(body, str) or body is None else orjson.dumps(body).decode()
    conn.execute(
        sql.INSERT_DEAD_LETTER,
        {
            "job_id": job_id, "task": task, "queue": queue, "reason": reason, "tries": tries,
            "error": error[:10_000], "traceback": traceback,
            "body": None if text is None else text[:_MAX_BODY_CHARS],
        },
    )  # fmt: skip
    rt.metrics.dead_letter(task=task or "unknown", reason=reason)
    log.error(
        "dead letter",
        extra={"action": "dead_letter", "job_id": job_id, "task": task, "reason": reason,
               "tries": tries},
    )  # fmt: skip


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


def _call(rt: Runtime, spec: JobSpec, tier: str, complete: Callable[..., Completion]) -> CallResult:
    """Call the tier's model (`complete`: the backend's, or a batch result's reader) and
    validate its answer. Never raises: every fault becomes an outcome, so that every call
    leaves an attempt row behind; and its texts are storable, so that the row goes in."""
    call = _call_and_validate(rt, spec, tier, complete)
    return dataclasses.replace(
        call,
        error=storable.text(call.error) or "",
        finish_reason=storable.text(call.finish_reason, storable.MAX_FINISH_REASON_CHARS),
    )


def _call_and_validate(
    rt: Runtime, spec: JobSpec, tier: str, complete: Callable[..., Completion]
) -> CallResult:
    timeout_s = _timeout_s(rt, tier, spec.max_tokens)
    try:
        completion = complete(spec, timeout_s=timeout_s)
    except RequestNotRun as exc:
        return CallResult(Outcome(exc.kind), error=str(exc))
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
        result = _validated(rt, spec, tier, completion)
    except InvalidOutput as exc:
        outcome = Outcome.LOW_CONFIDENCE if exc.rule == LOW_CONFIDENCE_RULE else Outcome.INVALID
        return dataclasses.replace(answered, outcome=outcome, error=str(exc))
    return dataclasses.replace(answered, result=result)


def _logprob_floor(rt: Runtime, tier: str) -> float | None:
    """TIERFLEET_MIN_MEAN_LOGPROB, on a rung below the top that asks for logprobs."""
    fleet = rt.settings.fleet
    if fleet.is_top(tier) or not fleet.tier(tier).logprobs:
        return None
    return rt.settings.min_mean_logprob


def _validated(rt: Runtime, spec: JobSpec, tier: str, completion: Completion) -> Any:
    """The result to store, or `InvalidOutput`: an answer that breaks a rule, that the
    validator cannot judge (it raised), or that the ledger cannot store as it is. The log
    names the job, never the answer."""
    try:
        result = validate(
            completion,
            spec.output_schema,
            min_mean_logprob=_logprob_floor(rt, tier),
        )
    except InvalidOutput:
        raise
    except Exception as exc:  # the answer was paid for: it is booked as invalid
        log.warning(
            "validation raised; the answer counts as invalid",
            extra={"action": "attempt.validation_error", "job_id": spec.id, "tier": tier,
                   "error_class": type(exc).__name__},
        )  # fmt: skip
        raised = f"the answer could not be validated: {type(exc).__name__}: {exc}"
        raise InvalidOutput(raised, rule=storable.VALIDATOR_RULE) from None
    why = storable.unstorable(result)
    if why is not None:
        raise InvalidOutput(why, rule=storable.UNSTORABLE_RULE)
    return result


def attempt_job(rt: Runtime, job_id: str, tier: str) -> Next | None:
    try:
        claimed = _claim(rt, job_id, tier)
    except _OnHold as held:
        return _hold(rt, job_id, tier, held.hold)
    if claimed is None:
        return None
    if claimed.collected:
        log.debug(
            "collected for a provider batch",
            extra={"action": "attempt.collected", "job_id": job_id, "tier": tier},
        )
        return None  # the batch task takes it from here (`workers/message_batches.py`)
    spec = claimed.spec
    backend = rt.backends[tier]
    started_at = _now()
    t0 = time.perf_counter()
    call = _call(rt, spec, tier, backend.complete)
    latency_ms = round((time.perf_counter() - t0) * 1000)
    cost = rt.prices[backend.model].cost_usd(call.usage)
    row = _attempt_row(
        job_id, claimed.seq, tier, backend, spec.feature, call, cost=cost,
        latency_ms=latency_ms, started_at=started_at,
    )  # fmt: skip
    return _settle(rt, claimed, tier, call, row)


@dataclass(frozen=True, slots=True)
class BatchResult:
    """A batch-mode request's place in the ledger, with its result from the provider."""

    row: Any  # `sql.BATCH_REQUESTS_OF`: the request and its job
    result: Any  # the provider's result object, read by the backend
    provider_batch: str  # our id of the provider batch
    started_at: dt.datetime  # when the provider batch was submitted
    fault: TierfleetError | None = None  # instead of a result: what befell the request


def book_batch_result(rt: Runtime, tier: str, item: BatchResult) -> Next | None:
    """Book one result of a provider batch as an attempt, exactly as a real-time answer
    is booked (validated, the policy's decision applied), priced at the batch discount."""
    backend = rt.backends[tier]
    claimed = _claimed(item.row.job_id, item.row)

    def read(job: JobSpec, *, timeout_s: float) -> Completion:
        if item.fault is not None:
            raise item.fault
        return backend.read_batch_result(item.result, job)  # type: ignore[attr-defined,no-any-return]

    call = _call(rt, claimed.spec, tier, read)
    cost = rt.prices[backend.model].cost_usd(call.usage, batch=True)
    row = _attempt_row(
        claimed.spec.id, claimed.seq, tier, backend, claimed.spec.feature, call, cost=cost,
        latency_ms=_ms_since(item.started_at), started_at=utc(item.started_at),
    )  # fmt: skip
    row["provider_batch_id"] = item.provider_batch
    return _settle(rt, claimed, tier, call, row)


def _settle(
    rt: Runtime, claimed: _Claimed, tier: str, call: CallResult, row: dict[str, Any]
) -> Next | None:
    """Book a model call's attempt, and say what comes next for its job."""
    spec = claimed.spec
    # The answer is paid for: wait out a ledger outage rather than call again.
    booked: list[Decision | None] = []

    def book(call: CallResult, row: dict[str, Any]) -> Decision | None:
        return _with_ledger_retry(rt, spec.id, lambda: _book(rt, claimed, tier, call, row, booked))

    try:
        decision = book(call, row)
    except (DataError, IntegrityError, UnicodeEncodeError) as exc:
        if ledger_unavailable(exc):
            raise
        call, row = _refused(spec, tier, call, row, exc)
        booked.clear()  # refused: nothing was written
        decision = book(call, row)
    rt.metrics.attempt(
        tier=tier,
        model=row["model"],
        provider=row["provider"],
        feature=spec.feature,
        outcome=call.outcome.value if decision else Outcome.ABANDONED.value,
        usage=call.usage,
        cost_usd=row["cost_usd"],
        latency_ms=row["latency_ms"],
    )
    if decision is None:
        log.warning(
            "answered after the lease lapsed; recorded, not applied",
            extra={"action": "attempt.fenced", "job_id": spec.id, "tier": tier},
        )
        return None
    _teach_router(rt, claimed, tier, decision)
    log.debug(
        "attempt",
        extra={
            "action": "attempt.done",
            "job_id": spec.id,
            "tier": tier,
            "feature": spec.feature,
            "outcome": call.outcome.value,
            "decision": decision.action.value,
        },
    )
    return _follow(rt, spec, tier, call.outcome, decision, claimed.created_at)


def _refused(
    spec: JobSpec, tier: str, call: CallResult, row: dict[str, Any], exc: Exception
) -> tuple[CallResult, dict[str, Any]]:
    """The ledger refused to book the attempt as it was (bad data, not an outage): it is
    booked as an invalid answer, with what the call really cost, and the reason. The log
    and the reason name the error's class, never the statement's parameters (the job's
    contents)."""
    refusal = type(exc).__name__
    orig = getattr(exc, "orig", None)
    if orig is not None:
        refusal += f": {type(orig).__name__}"  # e.g. "DataError: UntranslatableCharacter"
    log.error(
        "the ledger refused the attempt as it was; booked as an invalid answer",
        extra={"action": "attempt.refused", "job_id": spec.id, "tier": tier,
               "error_class": refusal},
    )  # fmt: skip
    error = f"the answer cannot be stored: the ledger refused it ({refusal})"
    invalid = dataclasses.replace(
        call, outcome=Outcome.INVALID, result=None, error=error, finish_reason=None
    )
    return invalid, {**row, "outcome": Outcome.INVALID, "error": error, "finish_reason": None}


def _teach_router(rt: Runtime, claimed: _Claimed, tier: str, decision: Decision) -> None:
    """Each outcome on a rung below the top is a label for the learned router: a valid
    answer says the rung sufficed, an escalation that it did not; a failure on the top
    takes back the escalations of the rungs that sent the job up (none could answer). An
    outcome is placed by the job's triage score on the rung it started on, by the prior's
    on a rung it climbed to. Routing state is advisory: a Redis that does not answer costs
    the label, never the job."""
    router = rt.triage.scorer
    if not isinstance(router, LearnedRouter):
        return
    spec, score, ladder = claimed.spec, claimed.triage_score, list(rt.policy.ladder)

    def climbed_from() -> set[str]:
        with rt.ledger.begin() as conn:
            params = {"p_id": spec.id, "p_floor": claimed.floor}
            return set(conn.execute(sql.CLIMBED_FROM, params).scalars())

    try:
        if tier in ladder[:-1]:
            if decision.action in (Action.SUCCEED, Action.ESCALATE):
                rung = ladder.index(tier)
                if rung > 0 and ladder[rung - 1] in climbed_from():  # climbed here, or started?
                    score = None
                router.learn(spec, tier, score, escalated=decision.action is Action.ESCALATE)
        elif decision.action is Action.FAIL and tier == ladder[-1]:
            failed = climbed_from()
            for rung_tier in (r for r in ladder[:-1] if r in failed):
                router.learn_escalation_failed(spec, score, rung_tier)
    except (redis.RedisError, OSError):
        log.warning(
            "cannot record a routing outcome", exc_info=True,
            extra={"action": "router.learn_error", "job_id": spec.id},
        )  # fmt: skip


def _book(
    rt: Runtime,
    claimed: _Claimed,
    tier: str,
    call: CallResult,
    row: dict[str, Any],
    booked: list[Decision | None],
) -> Decision | None:
    """Record the attempt and apply the policy's decision to the job, in one transaction;
    None when this worker's lease lapsed meanwhile (the attempt is kept, as abandoned,
    with its real usage and cost; the job's new owner decides).

    `booked` holds what earlier tries of this booking decided: a try whose commit landed
    but whose reply an outage cut off is found by its attempt row and not booked again
    (the successor of a lost worker writes that row too, but with its own start time)."""
    if not booked and claimed.capped_batch is None and rt.ledger.dialect == "postgresql":
        fast = _book_alone(rt, claimed, tier, call, row, booked)
        if fast is not _NOT_ALONE:
            return fast
    job_id = claimed.spec.id
    with rt.ledger.begin() as conn:
        if booked:
            landed = conn.execute(sql.ATTEMPT_BOOKED, {"p_id": row["id"]}).one_or_none()
            if landed is not None and (
                landed.outcome != Outcome.ABANDONED or utc(landed.started_at) == row["started_at"]
            ):
                return booked[-1]
        decision, statement, params = _decided(rt, conn, claimed, tier, call, row)
        if conn.dialect.name == "postgresql":
            applied = conn.execute(sql.BOOKING[statement], _booking(row, params)).first()
        else:
            applied = conn.execute(statement, params).first()
            if applied is not None:
                conn.execute(sql.INSERT_ATTEMPT, row)
        if applied is None:
            fenced = {
                **row,
                "outcome": Outcome.ABANDONED,
                "error": f"answered ({call.outcome.value}) after its lease lapsed; not applied",
            }
            conn.execute(sql.upsert_abandoned(conn.dialect.name), fenced)
            conn.execute(sql.ADD_COST, {"p_id": job_id, "p_cost": row["cost_usd"]})
        rt.budgets.add(conn, rt.budgets.scopes(conn, claimed.spec.feature, tier), row["cost_usd"])
        if claimed.capped_batch is not None and row["cost_usd"]:
            # last, so that the batch's row stays locked for the commit alone
            conn.execute(
                sql.ADD_BATCH_SPEND, {"p_batch": claimed.capped_batch, "p_cost": row["cost_usd"]}
            )
        booked.append(decision if applied is not None else None)
        return booked[-1]


_NO_BATCH = {"provider_batch_id": None}  # an attempt's row run outside a provider batch
_NOT_ALONE = Decision(Action.RETRY)  # a marker: `_book_alone` left the booking to `_book`


def _booking(row: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The parameters of `sql.BOOKING`: the record's, and the attempt's row as `a_*`."""
    return {**{f"a_{name}": value for name, value in {**_NO_BATCH, **row}.items()}, **params}


def _book_alone(
    rt: Runtime,
    claimed: _Claimed,
    tier: str,
    call: CallResult,
    row: dict[str, Any],
    booked: list[Decision | None],
) -> Decision | None:
    """The common booking in one statement, committed on its own (PostgreSQL): no daily
    budget or batch cap to add to, and the lease still held. Anything else, `_NOT_ALONE`:
    `_book`'s transaction does it (nothing was written). `booked` gets the decision
    before the statement runs, so that a try whose reply is lost is looked for, not
    booked again."""
    with rt.ledger.autocommit() as conn:
        if rt.budgets.scopes(conn, claimed.spec.feature, tier):
            return _NOT_ALONE
        decision, statement, params = _decided(rt, conn, claimed, tier, call, row)
        booked.append(decision)
        if conn.execute(sql.BOOKING[statement], _booking(row, params)).first() is not None:
            return decision
        booked.pop()  # fenced: nothing written
    return _NOT_ALONE


def _with_ledger_retry(rt: Runtime, job_id: str, write: Callable[[], _T]) -> _T:
    """Run `write`, retrying while the ledger is unreachable, for up to `db_retry_s`."""
    deadline = time.monotonic() + rt.settings.db_retry_s
    delay = 0.25
    while True:
        try:
            return write()
        except DBAPIError as exc:
            if not ledger_unavailable(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning(
                "ledger unavailable; holding the answer",
                extra={"action": "attempt.ledger_wait", "job_id": job_id, "delay_s": delay},
            )
            time.sleep(delay)
            delay = min(delay * 2, 8.0)


def _attempt_row(
    job_id: str,
    seq: int,
    tier: str,
    backend: Any,
    feature: str,
    call: CallResult,
    *,
    cost: Decimal,
    latency_ms: int,
    started_at: dt.datetime,
) -> dict[str, Any]:
    usage = call.usage
    return {
        "id": attempt_id(job_id, seq),
        "job_id": job_id,
        "seq": seq,
        "tier": tier,
        "model": backend.model,
        "provider": backend.provider,
        "outcome": call.outcome,
        "error": call.error or None,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "latency_ms": latency_ms,
        "cost_usd": cost,
        "mean_logprob": call.mean_logprob,
        "finish_reason": call.finish_reason,
        "feature": feature,
        "started_at": started_at,
    }


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
        not_run_before=sum(counts.get(o, 0) for o in _NOT_RUN),
    )


def _decided(
    rt: Runtime,
    conn: Connection,
    claimed: _Claimed,
    tier: str,
    call: CallResult,
    row: dict[str, Any],
) -> tuple[Decision, Any, dict[str, Any]]:
    """The policy's decision on this attempt, the statement that records it on the job,
    and that statement's parameters."""
    decision = _decide(rt, conn, claimed.spec.id, tier, call, claimed.floor)
    statement, params = _record(decision, call.result)
    params.update(p_id=claimed.spec.id, p_seq=claimed.seq, p_cost=row["cost_usd"])
    return decision, statement, params


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
    return _ms_since(created_at)


def _ms_since(moment: dt.datetime) -> int:
    return max(0, round((_now() - utc(moment)).total_seconds() * 1000))


def _s(seconds: float) -> dt.timedelta:
    return dt.timedelta(seconds=seconds)
