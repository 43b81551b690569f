"""The client services import to enqueue jobs: `from producers import Client`.

    client = Client.from_env()
    job_id = client.submit({"feature": "support-triage", "prompt": "...",
                            "output_schema": "ticket_triage"})
    view = client.wait(job_id, timeout_s=60)

`submit()` validates the envelope before anything is written, writes the job to the
ledger, then sends a small message (the id) to the triage queue.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import DBAPIError

from tierfleet import constants as C
from tierfleet.db import Ledger, engine_from_settings, not_migrated, not_migrated_error
from tierfleet.envelope import JobSpec, parse_envelope
from tierfleet.errors import ServiceUnavailable
from tierfleet.metrics import Metrics
from tierfleet.settings import Settings, redact_url
from tierfleet.store import JobView, get_job, insert_job, job_status
from tierfleet.transport import make_celery


class WaitTimeout(TimeoutError):
    """`Client.wait()` gave up before the job finished."""


class Client:
    def __init__(
        self, settings: Settings, ledger: Ledger, celery: Celery, metrics: Metrics | None = None
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.celery = celery
        self.metrics = metrics or Metrics.from_settings(settings)

    @classmethod
    def from_env(cls) -> Client:
        settings = Settings.from_env()
        return cls(settings, Ledger(engine_from_settings(settings)), make_celery(settings))

    def __repr__(self) -> str:
        return f"Client(database={self.ledger.dialect}, queue={self.settings.queue_triage!r})"

    def submit(self, envelope: Mapping[str, Any], *, batch_id: str | None = None) -> str:
        """Enqueue one job and return its id. Raises `InvalidEnvelope` naming the field,
        or the size of a job over `tierfleet.envelope.MAX_ENVELOPE_BYTES` of JSON.

        Idempotent on `idempotency_key` (and on `id`): a resubmit returns the existing
        job's id and enqueues nothing new, unless that job never left `queued`, in which
        case its triage message is sent again (triage ignores duplicates)."""
        spec = parse_envelope(envelope, tiers=self.settings.fleet.names)
        return self.submit_spec(spec, batch_id=batch_id)

    def submit_spec(
        self, spec: JobSpec, *, batch_id: str | None = None, team: str | None = None
    ) -> str:
        payload = spec.payload_json()  # over MAX_ENVELOPE_BYTES: InvalidEnvelope, nothing sent
        try:
            with self.ledger.session() as s:
                job_id, created = insert_job(
                    s, spec, batch_id=batch_id, payload_json=payload, team=team
                )
                still_queued = created or job_status(s, job_id) == C.JobStatus.QUEUED
        except DBAPIError as exc:
            if not_migrated(exc):
                raise not_migrated_error(self.settings.database_url_value()) from exc
            raise
        if still_queued:
            try:
                self.celery.send_task(
                    C.TASK_TRIAGE, args=[job_id], queue=self.settings.queue_triage
                )
            except BrokerError as exc:
                url = self.settings.redis_url_value()
                raise ServiceUnavailable(
                    f"cannot reach the broker{f' at {redact_url(url)}' if url else ''}: {exc}; "
                    f"job {job_id} is saved, queued: the reconciler sends it once the broker "
                    "is back, or submit it again (the same id or idempotency key is the same "
                    "job)"
                ) from exc
        if created:
            self.metrics.job_submitted(feature=spec.feature, route=spec.route)
        return job_id

    def get(self, job_id: str) -> JobView:
        """Status, tier, result, attempts and cost so far. Raises `JobNotFound`."""
        with self.ledger.session() as s:
            return get_job(s, job_id)

    def wait(self, job_id: str, timeout_s: float = 300.0) -> JobView:
        """Block until the job is terminal; raise `WaitTimeout` after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        delay = 0.02
        while True:
            view = self.get(job_id)
            if view.terminal:
                return view
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"job {job_id} still {view.status.value} after {timeout_s}s")
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.5)

    def close(self) -> None:
        self.ledger.engine.dispose()
        self.celery.close()
        self.metrics.close()
