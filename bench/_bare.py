"""The baseline of `bench/fleet_overhead.py`: two-hop no-op Celery chains on the fleet's
own broker and worker settings (`tierfleet.transport.make_celery`). Hop one runs on a
prefork pool like triage and sends hop two to a thread pool like a tier worker; hop two
counts itself done in Redis."""

from __future__ import annotations

import redis
from celery import Task

from tierfleet.settings import Settings
from tierfleet.transport import make_celery

settings = Settings.from_env()
app = make_celery(settings)
app.conf.task_queues = None
app.conf.task_default_queue = "bench.a"
DONE_KEY = "bench.bare.done"
_redis: redis.Redis | None = None


@app.task(name="bench.hop1", bind=True)
def hop1(self: Task, job_id: str) -> None:
    app.send_task("bench.hop2", args=[job_id], queue="bench.b")


@app.task(name="bench.hop2")
def hop2(job_id: str) -> None:
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(settings.redis_url_value() or "")
    _redis.incr(DONE_KEY)
