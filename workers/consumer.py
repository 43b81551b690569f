"""The worker's message consumer: Celery's, with messages it cannot run dead-lettered.

Celery logs an undecodable message, or one for a task it does not know, and acks it: the
message is gone with a log line. Here each is first written to `dead_letters` with the
error and (the start of) its body, so that nothing vanishes without a trace.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

from workers.execute import dead_letter
from workers.runtime import runtime

log = logging.getLogger("tierfleet.worker")


class Consumer(CeleryConsumer):  # type: ignore[misc]
    def on_decode_error(self, message: Any, exc: Exception) -> None:
        _keep(message, "undecodable", f"cannot decode the message: {type(exc).__name__}: {exc}")
        super().on_decode_error(message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        _keep(message, "unknown_message", "not a task message")
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        task = (message.headers or {}).get("task")
        _keep(message, "unknown_task", f"no task named {task!r}", task=task)
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        task = (message.headers or {}).get("task")
        _keep(message, "invalid_task", f"invalid task message: {exc}", task=task)
        super().on_invalid_task(body, message, exc)


def _keep(message: Any, reason: str, error: str, task: str | None = None) -> None:
    """Record the message; a ledger that cannot take it leaves Celery's log line only."""
    body = message.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="replace")
    queue = (getattr(message, "delivery_info", None) or {}).get("routing_key")
    try:
        rt = runtime()
        with rt.ledger.begin() as conn:
            dead_letter(
                rt, conn, job_id=None, task=task, queue=queue, reason=reason, tries=1,
                error=error, body=str(body),
            )  # fmt: skip
    except Exception:
        log.exception("cannot record a dead letter", extra={"action": "dead_letter.lost"})
