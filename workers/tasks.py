"""The Celery tasks: thin shells that run a step and send the message it asks for.

Messages carry the job id (and the tier); Postgres holds the payload.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task
from sqlalchemy.exc import OperationalError

from tierfleet import constants as C
from workers.execute import Next, attempt_job, triage_job
from workers.execute import triage_range as triage_range_job
from workers.runtime import Runtime, runtime

# A database that is briefly away is waited for; the message stays unacked meanwhile.
_DB_RETRY: dict[str, Any] = {
    "autoretry_for": (OperationalError,),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "max_retries": None,
}


def send_next(rt: Runtime, job_id: str, step: Next, producer: Any = None) -> None:
    rt.celery.send_task(
        C.TASK_ATTEMPT,
        args=[job_id, step.tier],
        queue=rt.settings.queue_for(step.tier),
        countdown=step.delay_s or None,
        producer=producer,
    )


@shared_task(name=C.TASK_TRIAGE, **_DB_RETRY)
def triage(job_id: str) -> None:
    rt = runtime()
    step = triage_job(rt, job_id)
    if step is not None:
        send_next(rt, job_id, step)


@shared_task(name=C.TASK_TRIAGE_RANGE, **_DB_RETRY)
def triage_range(batch_id: str, first: int, last: int) -> None:
    rt = runtime()
    steps = triage_range_job(rt, batch_id, first, last)
    with rt.celery.producer_or_acquire() as producer:
        for job_id, step in steps:
            send_next(rt, job_id, step, producer)


@shared_task(name=C.TASK_ATTEMPT, **_DB_RETRY)
def attempt(job_id: str, tier: str) -> None:
    rt = runtime()
    step = attempt_job(rt, job_id, tier)
    if step is not None:
        send_next(rt, job_id, step)
