"""The worker side's Celery app (the shared transport plus the tasks) and its pools.

A pool is what one `tierfleet worker --pool NAME` process consumes, and how:

| pool     | queues                   | Celery pool | concurrency (default)         |
|----------|--------------------------|-------------|-------------------------------|
| triage   | triage, tierfleet.control | prefork    | CPU count (scoring is CPU)    |
| slm      | tier.slm                 | threads     | TIERFLEET_SLM_CONCURRENCY, 32 |
| frontier | tier.frontier, tierfleet.batches | threads | TIERFLEET_FRONTIER_CONCURRENCY, 32 |
| all      | all five                 | threads     | TIERFLEET_SLM_CONCURRENCY     |

Tier workers wait on model calls, so they keep many requests in flight on threads (vLLM's
continuous batching wants them); one process and its connections serve them all.

`tierfleet.control` carries the reconciler's periodic runs (sent by beat), on a queue of
its own so that they never wait behind a backlog of jobs; `tierfleet.batches` carries the
Message Batches task's runs to the frontier workers, which hold the provider's client.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.signals import worker_process_init

from tierfleet import constants as C
from tierfleet.settings import Settings
from tierfleet.transport import make_celery
from workers import redis_transport, runtime

POOLS = ("triage", "slm", "frontier", "all")  # those of the default ladder


@dataclass(frozen=True, slots=True)
class PoolPlan:
    queues: list[str]
    tiers: tuple[str, ...]  # whose model clients this pool needs
    celery_pool: str
    concurrency: int


def create_app(settings: Settings, *, broker_url: str | None = None) -> Celery:
    redis_transport.install()
    app = make_celery(settings, broker_url=broker_url)
    app.conf.include = ["workers.tasks"]
    # Messages no task can run (undecodable, unknown) are dead-lettered, not just logged.
    app.conf.worker_consumer = "workers.consumer:Consumer"
    app.conf.beat_schedule = {
        "reconcile": {
            "task": C.TASK_RECONCILE,
            "schedule": settings.reconcile_interval_s,
            "options": {"queue": C.QUEUE_CONTROL, "expires": settings.reconcile_interval_s},
        },
        **{
            f"batches.{tier.name}": {
                "task": C.TASK_BATCHES,
                "schedule": settings.batch_interval_s,
                "kwargs": {"tier": tier.name},
                "options": {"queue": tier.batches_queue, "expires": settings.batch_interval_s},
            }
            for tier in settings.fleet
            if tier.batch
        },
        "depth": {
            "task": C.TASK_DEPTH,
            "schedule": settings.depth_interval_s,
            "options": {"queue": C.QUEUE_CONTROL, "expires": settings.depth_interval_s},
        },
    }
    import workers.tasks  # noqa: F401  (registers the shared tasks)

    app.finalize()
    return app


def pools(settings: Settings) -> tuple[str, ...]:
    """The pools a worker may serve: triage, one per tier of the ladder, all."""
    return ("triage", *settings.fleet.names, "all")


def plan_pool(settings: Settings, pool: str, concurrency: int | None = None) -> PoolPlan:
    fleet = settings.fleet
    if pool == "triage":
        queues = [settings.queue_triage, C.QUEUE_CONTROL]
        return PoolPlan(queues, (), "prefork", concurrency or os.cpu_count() or 1)
    if pool in fleet:
        tier = fleet.tier(pool)
        queues = [tier.queue, *([tier.batches_queue] if tier.batch else [])]
        return PoolPlan(queues, (tier.name,), "threads", concurrency or tier.concurrency)
    if pool == "all":
        queues = [settings.queue_triage, *(t.queue for t in fleet), C.QUEUE_CONTROL]
        queues += [t.batches_queue for t in fleet if t.batch]
        n = concurrency or fleet.bottom.concurrency
        return PoolPlan(queues, fleet.names, "threads", n)
    raise ValueError(f"unknown pool {pool!r}; pools are {', '.join(pools(settings))}")


@worker_process_init.connect
def _fresh_runtime_after_fork(**_: Any) -> None:
    runtime.reset_after_fork()
