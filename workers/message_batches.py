"""Message Batches: jobs that can wait go to the provider in batches, at its batch price
(half, for Anthropic), instead of one request each, on any anthropic tier of the ladder
with `batch = true` (in the default fleet: the frontier, unless
`TIERFLEET_MESSAGE_BATCHES=off`). Each tier's requests go out in provider batches of
their own and are booked on that tier.

The life of a batch-mode attempt (a job with `latency: batch`, on a tier with `batch`):

1. **Collected.** The claim (`workers/execute.py`) leases the job for `batch_lease_s` and
   records a `batch_requests` row naming the tier, in one transaction. No call is made;
   the message is acked. Collected requests live in Postgres, never in a worker's memory.
2. **Submitted.** The beat task (`tierfleet.batches` with the tier's name, run by a worker
   of that tier's pool on its queue `tierfleet.batches.NAME`) takes the tier's waiting
   requests, oldest first, once `batch_min_requests` wait or the oldest has waited
   `batch_max_wait_s`; a provider batch holds at most `batch_max_requests` requests and
   `batch_max_bytes` of them. The `provider_batches` row is committed as `submitting`,
   with its requests chosen, before the create call; the provider's id is recorded after.
   A create whose answer was lost (a crash, a timeout) is found again in the provider's
   list by its creation time and size once the submitter's lock lapses, or sent again.
3. **Ingested.** Each open batch is retrieved; once `ended`, its results are streamed
   and each is booked exactly as a real-time answer is (validated, priced at the batch
   discount, the policy's decision applied). Booking is idempotent on the attempt id
   (the request's `custom_id`): an ingest that dies half-way and runs again books only
   what it had not. A request the provider never ran (`expired`, `canceled`) is
   collected again once, then its job fails with the reason.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import insert, select, update

from tierfleet.db import utc
from tierfleet.envelope import JobSpec
from tierfleet.errors import (
    ConfigurationError,
    PermanentError,
    ProviderRejected,
    ProviderUnavailable,
    RetryableError,
    TierfleetError,
)
from tierfleet.models import ProviderBatch
from workers import sql
from workers.backends.base import BatchBackend, BatchState
from workers.execute import BatchResult, Next, book_batch_result
from workers.runtime import Runtime

log = logging.getLogger("tierfleet.batches")

SendAttempt = Callable[[Runtime, str, Next], None]

SUBMITTING = "submitting"
OPEN = ("in_progress", "canceling", "ended")  # at the provider, not yet ingested
INGESTED = "ingested"
REJECTED = "rejected"  # the provider refused the whole batch: its requests were failed
_INGEST_CHUNK = 500  # results booked per read of the ledger
_IN_CHUNK = 10_000  # ids per IN (...) list
_FOUND_SLACK = dt.timedelta(minutes=5)  # clock skew when matching a lost create

_pb = ProviderBatch.__table__.c


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Report:
    """What one run of the batch task did."""

    submitted: list[str] = field(default_factory=list)  # provider batch ids created
    recovered: list[str] = field(default_factory=list)  # lost creates found or re-sent
    ingested: dict[str, int] = field(default_factory=dict)  # provider batch id: results booked
    polled: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "submitted": self.submitted,
            "recovered": self.recovered,
            "ingested": self.ingested,
            "polled": self.polled,
        }


def tier_of(rt: Runtime, tier: str | None) -> str:
    """`tier`, or the top rung when None (the default fleet's frontier)."""
    return rt.settings.fleet.tier(tier).name if tier else rt.settings.fleet.top.name


def batch_backend(rt: Runtime, tier: str | None = None) -> BatchBackend | None:
    backend = rt.backends.get(tier_of(rt, tier))
    if rt.settings.message_batches == "off" or not isinstance(backend, BatchBackend):
        return None
    return backend


def require_backend(rt: Runtime, tier: str | None = None) -> BatchBackend:
    backend = batch_backend(rt, tier)
    if backend is None:
        name = tier_of(rt, tier)
        why = (
            "TIERFLEET_MESSAGE_BATCHES=off"
            if rt.settings.message_batches == "off"
            else f"the {name} backend has none (simulated models?)"
        )
        raise ConfigurationError(f"Message Batches are not in use: {why}")
    return backend


def run(rt: Runtime, send: SendAttempt, *, tier: str | None = None, force: bool = False) -> Report:
    """One pass for `tier` (None: the top rung): recover lost creates, submit what is due
    (`force`: whatever waits), poll open batches and ingest the ended ones. Only that
    tier's requests and provider batches are touched; results are booked on it."""
    report = Report()
    backend = batch_backend(rt, tier)
    if backend is None:
        return report
    name = tier_of(rt, tier)
    _recover_submitting(rt, backend, name, report, send)
    while _submit_one(rt, backend, name, report, send, force=force):
        pass
    _poll(rt, backend, name, report, send)
    return report


# --- submit ------------------------------------------------------------------------------


def _submit_one(
    rt: Runtime,
    backend: BatchBackend,
    tier: str,
    report: Report,
    send: SendAttempt,
    *,
    force: bool,
) -> bool:
    """Submit one provider batch of `tier`'s requests if one is due; True if one went out."""
    settings = rt.settings
    now = _now()
    local_id = "pb_" + uuid.uuid4().hex
    with rt.ledger.begin() as conn:
        conn.execute(sql.DROP_STALE_WAITING, {"p_before": now - dt.timedelta(seconds=60)})
        rows = conn.execute(
            sql.WAITING, {"p_limit": settings.batch_max_requests, "p_tier": tier}
        ).all()
        if not rows:
            return False
        oldest_s = (now - utc(rows[0].collected_at)).total_seconds()
        due = len(rows) >= settings.batch_min_requests or oldest_s >= settings.batch_max_wait_s
        if not (due or force):
            return False  # not due: the locks go with the rollback
        requests, size = _requests(backend, rows, settings.batch_max_bytes)
        chosen = [r["custom_id"] for r in requests]
        conn.execute(
            insert(ProviderBatch),
            {
                "id": local_id, "tier": tier, "provider": getattr(backend, "provider", "unknown"),
                "model": getattr(backend, "model", "unknown"), "status": SUBMITTING,
                "requests": len(requests), "request_bytes": size,
                "locked_until": _lock_until(rt, now), "created_at": now,
            },
        )  # fmt: skip
        for part in _chunks(chosen, _IN_CHUNK):
            conn.execute(sql.ASSIGN_REQUESTS, {"p_ids": part, "p_batch": local_id})
    # The intent is durable; now the provider.
    _create(rt, backend, tier, local_id, requests, report, send)
    report.submitted.append(local_id)
    return True


def _requests(
    backend: BatchBackend, rows: Sequence[Any], max_bytes: int | None
) -> tuple[list[dict[str, Any]], int]:
    """The batch lines for `rows`, in order, up to `max_bytes` of JSON in all (None: all
    of them, as chosen before)."""
    requests: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        spec = JobSpec.from_row(
            id=row.job_id, feature=row.feature, route=row.route, latency=row.latency,
            payload=row.payload,
        )  # fmt: skip
        request = backend.batch_request(spec, row.id)
        length = len(orjson.dumps(request)) + 1
        if max_bytes is not None and requests and size + length > max_bytes:
            break
        requests.append(request)
        size += length
    return requests, size


def _create(
    rt: Runtime,
    backend: BatchBackend,
    tier: str,
    local_id: str,
    requests: list[dict[str, Any]],
    report: Report,
    send: SendAttempt,
) -> None:
    try:
        state = backend.create_batch(requests)
    except RetryableError as exc:
        # Perhaps created, perhaps not: the row stays `submitting` and, once its lock
        # lapses, is looked for at the provider before it is sent again.
        log.warning(
            "creating a provider batch failed; it is looked for, then sent again",
            extra={"action": "batches.create_error", "batch": local_id, "tier": tier,
                   "error": str(exc)},
        )  # fmt: skip
        return
    except PermanentError as exc:
        _reject(rt, tier, local_id, str(exc), send)
        return
    _record_created(rt, local_id, state)
    rt.metrics.batch_requests(event="submitted", count=len(requests), tier=tier)
    log.info(
        "provider batch submitted",
        extra={"action": "batches.submitted", "batch": local_id, "provider_batch": state.id,
               "tier": tier, "requests": len(requests)},
    )  # fmt: skip


def _record_created(rt: Runtime, local_id: str, state: BatchState) -> None:
    with rt.ledger.begin() as conn:
        conn.execute(
            update(ProviderBatch)
            .where(_pb.id == local_id)
            .values(
                provider_batch_id=state.id, status=state.status, submitted_at=_now(),
                locked_until=None, **_counts(state),
            )
        )  # fmt: skip


def _reject(rt: Runtime, tier: str, local_id: str, error: str, send: SendAttempt) -> None:
    """The provider refused the batch itself: each of its requests is booked as refused
    (the fault policy fails the job with the reason)."""
    log.error(
        "the provider refused a batch",
        extra={"action": "batches.rejected", "batch": local_id, "tier": tier, "error": error},
    )
    with rt.ledger.begin() as conn:
        rows = conn.execute(sql.BATCH_REQUESTS_OF, {"p_batch": local_id}).all()
    for row in rows:
        _book(rt, tier, row, None, local_id, _now(), send, fault=ProviderRejected(error))
    with rt.ledger.begin() as conn:
        conn.execute(
            update(ProviderBatch)
            .where(_pb.id == local_id)
            .values(status=REJECTED, error=error[:10_000], locked_until=None)
        )


def _recover_submitting(
    rt: Runtime, backend: BatchBackend, tier: str, report: Report, send: SendAttempt
) -> None:
    """Provider batches left `submitting` past their lock: the create's answer was lost.
    The batch is looked for at the provider (created since, of the same size, not one we
    know); found, it is adopted; not found, it is sent again."""
    now = _now()
    with rt.ledger.begin() as conn:
        lost = conn.execute(
            update(ProviderBatch)
            .where(
                _pb.status == SUBMITTING,
                _pb.tier == tier,
                _pb.locked_until < now,
            )
            .values(locked_until=_lock_until(rt, now))
            .returning(_pb.id, _pb.requests, _pb.created_at)
        ).all()
    for row in lost:
        since = utc(row.created_at) - _FOUND_SLACK
        with rt.ledger.begin() as conn:
            known = set(
                conn.execute(
                    select(_pb.provider_batch_id).where(
                        _pb.provider_batch_id.is_not(None), _pb.created_at >= since
                    )
                ).scalars()
            )
        found = [
            b
            for b in backend.list_batches(created_after=since)
            if b.id not in known and b.total == row.requests
        ]
        if found:
            state = min(found, key=lambda b: b.created_at)
            _record_created(rt, row.id, state)
            log.warning(
                "adopted a provider batch whose create had lost its answer",
                extra={"action": "batches.adopted", "batch": row.id, "provider_batch": state.id},
            )
        else:
            with rt.ledger.begin() as conn:
                rows = conn.execute(sql.BATCH_REQUESTS_OF, {"p_batch": row.id}).all()
            requests, _ = _requests(backend, rows, None)
            _create(rt, backend, tier, row.id, requests, report, send)
        report.recovered.append(row.id)


# --- poll and ingest -----------------------------------------------------------------------


def _poll(rt: Runtime, backend: BatchBackend, tier: str, report: Report, send: SendAttempt) -> None:
    with rt.ledger.begin() as conn:
        open_ = conn.execute(
            select(_pb.id, _pb.provider_batch_id)
            .where(_pb.status.in_(OPEN), _pb.tier == tier, _pb.provider_batch_id.is_not(None))
            .order_by(_pb.created_at)
        ).all()
    for local_id, provider_id in open_:
        if not _lock(rt, local_id):
            continue  # another worker has it
        report.polled += 1
        try:
            state = backend.retrieve_batch(provider_id)
        except RetryableError as exc:
            log.warning(
                "cannot retrieve a provider batch; next time",
                extra={"action": "batches.poll_error", "batch": local_id, "error": str(exc)},
            )
            _unlock(rt, local_id)
            continue
        with rt.ledger.begin() as conn:
            conn.execute(
                update(ProviderBatch)
                .where(_pb.id == local_id)
                .values(status=state.status, ended_at=state.ended_at, **_counts(state))
            )
        if state.status != "ended":
            _unlock(rt, local_id)
            continue
        report.ingested[provider_id] = ingest(rt, backend, local_id, provider_id, send)


def ingest(
    rt: Runtime, backend: BatchBackend, local_id: str, provider_id: str, send: SendAttempt
) -> int:
    """Book every result of an ended batch not booked yet, on the batch's tier; the number
    booked now."""
    with rt.ledger.begin() as conn:
        tier, submitted_at = conn.execute(
            select(_pb.tier, _pb.submitted_at).where(_pb.id == local_id)
        ).one()
    started = utc(submitted_at) if submitted_at is not None else _now()
    booked = 0
    for chunk in _chunks_of(backend.batch_results(provider_id), _INGEST_CHUNK):
        booked += _ingest_chunk(rt, tier, local_id, started, chunk, send)
        _lock(rt, local_id, renew=True)
    # requests the provider sent no result for: a fault, retried like one
    with rt.ledger.begin() as conn:
        missing = conn.execute(sql.UNBOOKED_OF, {"p_batch": local_id}).all()
    for row in missing:
        fault = ProviderUnavailable(f"{provider_id}: the batch's results have none for it")
        _book(rt, tier, row, None, local_id, started, send, fault=fault)
        booked += 1
    with rt.ledger.begin() as conn:
        conn.execute(
            update(ProviderBatch)
            .where(_pb.id == local_id)
            .values(
                status=INGESTED, ingested=_pb.ingested + booked, ingested_at=_now(),
                locked_until=None,
            )
        )  # fmt: skip
    rt.metrics.batch_requests(event="ingested", count=booked, tier=tier)
    log.info(
        "provider batch ingested",
        extra={"action": "batches.ingested", "batch": local_id, "provider_batch": provider_id,
               "tier": tier, "booked": booked},
    )  # fmt: skip
    return booked


def _ingest_chunk(
    rt: Runtime,
    tier: str,
    local_id: str,
    started: dt.datetime,
    chunk: list[tuple[str, Any]],
    send: SendAttempt,
) -> int:
    ids = [custom_id for custom_id, _ in chunk]
    with rt.ledger.begin() as conn:
        done = set(conn.execute(sql.BOOKED_AMONG, {"p_ids": ids}).scalars())
        rows = {r.id: r for r in conn.execute(sql.BATCH_REQUESTS_BY_ID, {"p_ids": ids}).all()}
    booked = 0
    for custom_id, result in chunk:
        if custom_id in done:
            continue  # booked by an earlier ingest
        row = rows.get(custom_id)
        if row is None:
            log.warning(
                "a batch result matches no collected request",
                extra={"action": "batches.unknown_result", "batch": local_id,
                       "custom_id": custom_id},
            )  # fmt: skip
            continue
        _book(rt, tier, row, result, local_id, started, send)
        booked += 1
    return booked


def _book(
    rt: Runtime,
    tier: str,
    row: Any,
    result: Any,
    local_id: str,
    started: dt.datetime,
    send: SendAttempt,
    *,
    fault: TierfleetError | None = None,
) -> None:
    step = book_batch_result(rt, tier, BatchResult(row, result, local_id, started, fault))
    if step is not None:
        send(rt, row.job_id, step)


def _lock(rt: Runtime, local_id: str, *, renew: bool = False) -> bool:
    now = _now()
    free = (_pb.locked_until.is_(None)) | (_pb.locked_until < now)
    with rt.ledger.begin() as conn:
        stmt = update(ProviderBatch).where(_pb.id == local_id)
        if not renew:
            stmt = stmt.where(free)
        got = conn.execute(stmt.values(locked_until=_lock_until(rt, now)).returning(_pb.id)).first()
    return got is not None


def _lock_until(rt: Runtime, now: dt.datetime) -> dt.datetime:
    return now + dt.timedelta(seconds=rt.settings.batch_lock_s)


def _unlock(rt: Runtime, local_id: str) -> None:
    with rt.ledger.begin() as conn:
        conn.execute(update(ProviderBatch).where(_pb.id == local_id).values(locked_until=None))


def _counts(state: BatchState) -> dict[str, int]:
    return {
        name: state.counts.get(name, 0) for name in ("succeeded", "errored", "expired", "canceled")
    }


def _chunks(items: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _chunks_of(items: Iterator[tuple[str, Any]], n: int) -> Iterator[list[tuple[str, Any]]]:
    chunk: list[tuple[str, Any]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --- what the CLI shows and does ------------------------------------------------------------


def listing(rt: Runtime, *, limit: int = 50, tier: str | None = None) -> dict[str, Any]:
    """The provider batches, newest first, each with its tier, and how many requests wait
    to be sent (`tier`: that tier's alone)."""
    query = select(ProviderBatch).order_by(_pb.created_at.desc()).limit(limit)
    if tier is not None:
        query = query.where(_pb.tier == tier)
    with rt.ledger.begin() as conn:
        rows = conn.execute(query)
        batches = [
            {
                "id": r.id, "tier": r.tier, "provider_batch_id": r.provider_batch_id,
                "status": r.status,
                "model": r.model, "requests": r.requests, "bytes": r.request_bytes,
                "succeeded": r.succeeded, "errored": r.errored, "expired": r.expired,
                "canceled": r.canceled, "ingested": r.ingested,
                "created_at": _iso(r.created_at), "ended_at": _iso(r.ended_at),
                "ingested_at": _iso(r.ingested_at), "error": r.error,
            }
            for r in rows
        ]  # fmt: skip
    by_tier = waiting_by_tier(rt)
    waiting = by_tier.get(tier, 0) if tier is not None else sum(by_tier.values())
    return {"waiting": waiting, "batches": batches}


def waiting_by_tier(rt: Runtime) -> dict[str, int]:
    """Requests waiting to be sent, per tier."""
    with rt.ledger.begin() as conn:
        return {str(tier): int(n) for tier, n in conn.execute(sql.WAITING_COUNT)}


def cancel(rt: Runtime, batch: str) -> BatchState:
    """Ask the provider to cancel a batch (ours or the provider's id), through its tier's
    backend. Requests not yet run come back `canceled`, and are collected again once (see
    the module's notes)."""
    if rt.settings.message_batches == "off":
        require_backend(rt)  # names TIERFLEET_MESSAGE_BATCHES=off
    with rt.ledger.begin() as conn:
        row = conn.execute(
            select(_pb.id, _pb.tier, _pb.provider_batch_id, _pb.status).where(
                (_pb.id == batch) | (_pb.provider_batch_id == batch)
            )
        ).first()
    if row is None or row.provider_batch_id is None:
        raise PermanentError(f"no provider batch {batch!r} (see `tierfleet batches`)")
    backend = require_backend(rt, row.tier if row.tier in rt.settings.fleet else None)
    if row.status not in OPEN:
        raise PermanentError(f"provider batch {batch!r} is {row.status}: nothing to cancel")
    state = backend.cancel_batch(row.provider_batch_id)
    with rt.ledger.begin() as conn:
        conn.execute(
            update(ProviderBatch)
            .where(_pb.id == row.id)
            .values(status=state.status, **_counts(state))
        )
    return state


def _iso(when: dt.datetime | None) -> str | None:
    return None if when is None else utc(when).isoformat()
