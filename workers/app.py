"""The worker side's Celery app: the shared transport plus the tasks, and pools.

`create_app()` is called by `tierfleet worker` and by the embedded demo; the runtime each
worker process needs (ledger, backends, ...) is built lazily after the fork.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from tierfleet.db import Ledger
from tierfleet.settings import Settings
from tierfleet.transport import make_celery
from workers import runtime

POOLS = ("triage", "slm", "frontier", "all")


def create_app(
    settings: Settings, *, broker_url: str | None = None, ledger: Ledger | None = None
) -> Celery:
    app = make_celery(settings, broker_url=broker_url)
    app.conf.include = ["workers.tasks"]
    import workers.tasks  # noqa: F401  (registers the shared tasks)

    app.finalize()
    runtime.install(settings, app, ledger)
    return app


def queues_for_pool(settings: Settings, pool: str) -> list[str]:
    return {
        "triage": [settings.queue_triage],
        "slm": [settings.queue_slm],
        "frontier": [settings.queue_frontier],
        "all": [settings.queue_triage, settings.queue_slm, settings.queue_frontier],
    }[pool]


@worker_process_init.connect
def _fresh_runtime_after_fork(**_: Any) -> None:
    runtime.reset_after_fork()
