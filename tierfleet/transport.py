"""The Celery application both sides share: broker, serialisation and durability settings.

Producers use it only to send messages by task name; workers register their tasks on it.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.entity import Queue

from tierfleet.errors import ConfigurationError
from tierfleet.settings import Settings, redact_url

IN_PROCESS_BROKER = "memory://localhost/"


class BrokerURL(str):
    """The broker URL as Celery's configuration holds it: the URL itself to whatever
    connects with it, `redis://:***@host` to `repr()`, so that printing the app's `conf`
    (a mapping of reprs) never shows the Redis password."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(redact_url(str(self)))


def make_celery(settings: Settings, *, broker_url: str | None = None) -> Celery:
    """A configured Celery app. `broker_url` overrides REDIS_URL (the demo's memory://)."""
    url = broker_url or settings.redis_url_value()
    if url is None:
        raise ConfigurationError("REDIS_URL is not set; e.g. redis://127.0.0.1:6379/0")
    app = Celery("tierfleet", set_as_current=False)
    app.conf.update(_conf(settings, url))
    return app


def all_queues(settings: Settings) -> list[str]:
    return [settings.queue_triage, *(tier.queue for tier in settings.fleet)]


def _conf(settings: Settings, broker_url: str) -> dict[str, Any]:
    return {
        "broker_url": BrokerURL(broker_url),
        "broker_connection_retry_on_startup": True,
        # Longer than the longest call plus its retries: a message is redelivered
        # only when its worker really died.
        "broker_transport_options": _transport_options(settings, broker_url),
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        # Durability: ack after the work is durable; a killed worker's message returns.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.queue_triage,
        "task_queues": [Queue(name) for name in all_queues(settings)],  # type: ignore[no-untyped-call]
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "enable_utc": True,
    }


def _transport_options(settings: Settings, broker_url: str) -> dict[str, Any]:
    options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
    if broker_url.startswith("memory://"):
        options["polling_interval"] = 0.005  # the in-process broker polls; keep it brisk
    return options
