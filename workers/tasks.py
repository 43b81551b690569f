"""The Celery tasks: thin shells that run a step and send the message it asks for.

Messages carry the job id (and the tier); Postgres holds the payload. A step that finds
the ledger away is retried with backoff, as long as it takes (the message is acked only
once its retry is on the queue). A step that raises anything else is retried
`max_task_errors` times and then dead-lettered: its job fails, and the traceback is kept
in `dead_letters`.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any

from celery import Task, shared_task
from sqlalchemy.exc import DBAPIError

from tierfleet import constants as C
from tierfleet.db import ledger_unavailable
from workers.execute import Next, attempt_job, dead_letter, triage_job
from workers.execute import triage_range as triage_range_job
from workers.reconcile import reconcile as reconcile_jobs
from workers.runtime import Runtime, runtime

log = logging.getLogger("tierfleet.worker")


def send_next(rt: Runtime, job_id: str, step: Next, producer: Any = None) -> None:
    rt.celery.send_task(
        C.TASK_ATTEMPT,
        args=[job_id, step.tier],
        queue=rt.settings.queue_for(step.tier),
        countdown=step.delay_s or None,
        producer=producer,
    )


def _backoff_s(retries: int) -> float:
    return float(min(30, 2**retries))


def _guarded(task: Task, job_id: str | None, step: Callable[[Runtime], None]) -> None:
    """Run `step`; retry it on a ledger outage, or on an error up to the limit."""
    rt = runtime()
    retries = task.request.retries
    try:
        step(rt)
    except DBAPIError as exc:
        if not ledger_unavailable(exc):
            _error(task, rt, job_id, exc, retries)
            return
        log.warning(
            "ledger unavailable; the message is retried",
            extra={"action": "task.ledger_wait", "task": task.name, "job_id": job_id},
        )
        raise task.retry(countdown=_backoff_s(retries), max_retries=None) from None
    except Exception as exc:
        _error(task, rt, job_id, exc, retries)


def _error(task: Task, rt: Runtime, job_id: str | None, exc: Exception, retries: int) -> None:
    tries = retries + 1
    if tries < rt.settings.max_task_errors:
        log.warning(
            "step raised; retrying",
            exc_info=not isinstance(exc, DBAPIError),  # its text holds the job's contents
            extra={"action": "task.error", "task": task.name, "job_id": job_id, "tries": tries,
                   "error_class": type(exc).__name__},
        )  # fmt: skip
        raise task.retry(countdown=_backoff_s(retries), max_retries=None) from None
    delivery = task.request.delivery_info or {}
    with rt.ledger.begin() as conn:
        dead_letter(
            rt, conn, job_id=job_id, task=task.name, queue=delivery.get("routing_key"),
            reason="errors", tries=tries,
            error=f"dead letter after {tries} tries: {type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(), body=list(task.request.args or ()),
        )  # fmt: skip


@shared_task(name=C.TASK_TRIAGE, bind=True)
def triage(self: Task, job_id: str) -> None:
    def step(rt: Runtime) -> None:
        nxt = triage_job(rt, job_id)
        if nxt is not None:
            send_next(rt, job_id, nxt)

    _guarded(self, job_id, step)


@shared_task(name=C.TASK_TRIAGE_RANGE, bind=True)
def triage_range(self: Task, batch_id: str, first: int, last: int) -> None:
    def step(rt: Runtime) -> None:
        steps, alone = triage_range_job(rt, batch_id, first, last)
        with rt.celery.producer_or_acquire() as producer:
            for job_id, nxt in steps:
                send_next(rt, job_id, nxt, producer)
            for job_id in alone:
                rt.celery.send_task(
                    C.TASK_TRIAGE, args=[job_id], queue=rt.settings.queue_triage,
                    producer=producer,
                )  # fmt: skip

    _guarded(self, None, step)


@shared_task(name=C.TASK_ATTEMPT, bind=True)
def attempt(self: Task, job_id: str, tier: str) -> None:
    def step(rt: Runtime) -> None:
        nxt = attempt_job(rt, job_id, tier)
        if nxt is not None:
            send_next(rt, job_id, nxt)

    _guarded(self, job_id, step)


@shared_task(name=C.TASK_RECONCILE, bind=True)
def reconcile(self: Task) -> None:
    """Periodic (beat): re-drive jobs stranded by a lost message or a lost worker."""
    reconcile_jobs(runtime(), send_triage, send_attempt)


@shared_task(name=C.TASK_DEPTH, bind=True)
def depth(self: Task) -> None:
    """Periodic (beat): queue depth, the oldest wait, vLLM's queue and the replicas each
    pool needs, as DogStatsD gauges."""
    import redis

    from workers import depth as queue_depth
    from workers import scale

    rt = runtime()
    url = rt.settings.real_redis_url()
    if url is None:
        return
    client = redis.Redis.from_url(url)
    try:
        reading = queue_depth.read(rt.settings, rt.ledger, client)
    finally:
        client.close()
    queue_depth.publish(reading, rt.metrics)
    scale.publish(scale.recommend(rt.settings, rt.ledger, reading), rt.metrics)


@shared_task(name=C.TASK_BATCHES, bind=True)
def batches(self: Task, tier: str | None = None) -> None:
    """Periodic (beat), on a worker of `tier` (a tier with `batch`): send its collected
    batch-mode requests that are due as provider batches, and ingest its provider
    batches that have ended."""
    from workers import message_batches

    rt = runtime()
    try:
        message_batches.run(rt, send_next, tier=tier)
    except DBAPIError as exc:
        if not ledger_unavailable(exc):
            raise
        log.warning(
            "ledger unavailable; the batches wait for the next run",
            extra={"action": "batches.ledger_wait"},
        )


def send_triage(rt: Runtime, job_ids: list[str]) -> None:
    with rt.celery.producer_or_acquire() as producer:
        for job_id in job_ids:
            rt.celery.send_task(
                C.TASK_TRIAGE, args=[job_id], queue=rt.settings.queue_triage, producer=producer
            )


def send_attempt(rt: Runtime, jobs: list[tuple[str, str]]) -> None:
    with rt.celery.producer_or_acquire() as producer:
        for job_id, tier in jobs:
            send_next(rt, job_id, Next(tier), producer)
