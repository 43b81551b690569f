"""Queue depth and scaling on the real Redis and Postgres: depth counts ready messages in
every priority step and those delivered but unacknowledged, the oldest wait comes from
the ledger, recommendations follow hand arithmetic, and the gauges reach DogStatsD."""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid

import pytest
import redis
from sqlalchemy import insert, update
from typer.testing import CliRunner

from tests.conftest import StatsdListener, wait_until
from tests.integration.test_steps import new_job
from tierfleet import constants as C
from tierfleet.cli import app
from tierfleet.constants import JobStatus, Outcome
from tierfleet.metrics import Metrics
from tierfleet.models import Attempt, Job
from workers import depth as queue_depth
from workers import scale
from workers.broker import PRIORITY_SEP
from workers.runtime import Runtime

pytestmark = pytest.mark.integration


def _unacked(r: redis.Redis, queue: str, n: int) -> None:
    for i in range(n):
        message = {"body": "", "headers": {"task": C.TASK_ATTEMPT}, "properties": {}}
        r.hset(C.REDIS_UNACKED, f"tag-{queue}-{i}", json.dumps([message, "", queue]))


def _age(rt: Runtime, job_id: str, seconds: float, **values: object) -> None:
    when = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    with rt.ledger.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(updated_at=when, **values))


def test_depth_counts_priorities_unacked_and_the_oldest_wait(rt: Runtime, redis_url: str) -> None:
    s = rt.settings
    celery = rt.celery
    for _ in range(5):
        celery.send_task(C.TASK_ATTEMPT, args=["x", "slm"], queue=s.queue_slm)
    for _ in range(3):  # prioritised: kombu keeps them on a list of their own
        celery.send_task(C.TASK_ATTEMPT, args=["y", "slm"], queue=s.queue_slm, priority=6)
    with redis.Redis.from_url(redis_url) as r:
        assert r.llen(f"{s.queue_slm}{PRIORITY_SEP}6") == 3  # where the spec says they are
        _unacked(r, s.queue_slm, 2)
        _unacked(r, s.queue_frontier, 4)
    old = new_job(rt, route="slm")
    newer = new_job(rt, route="slm")
    _age(rt, old, 120, status=JobStatus.TRIAGED, tier="slm")
    _age(rt, newer, 10, status=JobStatus.TRIAGED, tier="slm")
    queued = new_job(rt)
    _age(rt, queued, 30)

    with redis.Redis.from_url(redis_url) as r:
        reading = queue_depth.read(s, rt.ledger, r)
    by_queue = {q.queue: q for q in reading.queues}
    slm, frontier, triage = (
        by_queue[s.queue_slm],
        by_queue[s.queue_frontier],
        by_queue[s.queue_triage],
    )
    assert (slm.ready, slm.unacked, slm.depth, slm.waiting_jobs) == (8, 2, 10, 2)
    assert slm.oldest_wait_s is not None and 119 <= slm.oldest_wait_s < 130
    assert (frontier.ready, frontier.unacked, frontier.waiting_jobs) == (0, 4, 0)
    assert frontier.oldest_wait_s is None
    assert (
        triage.waiting_jobs == 1 and triage.oldest_wait_s is not None and triage.oldest_wait_s >= 29
    )

    result = CliRunner().invoke(app, ["depth", "--json"])
    assert result.exit_code == 0, result.output
    shown = {q["queue"]: q for q in json.loads(result.stdout)["queues"]}
    assert shown[s.queue_slm]["depth"] == 10 and shown[s.queue_frontier]["unacked"] == 4


def _attempts(rt: Runtime, tier: str, n: int, latency_ms: int) -> None:
    job_id = new_job(rt)
    rows = [
        {
            "id": str(uuid.uuid4()), "job_id": job_id, "seq": i + 1, "tier": tier,
            "model": "m", "provider": "p", "outcome": Outcome.SUCCEEDED, "latency_ms": latency_ms,
            "cost_usd": 0, "feature": "f", "started_at": dt.datetime.now(dt.UTC),
        }
        for i in range(n)
    ]  # fmt: skip
    with rt.ledger.begin() as conn:
        conn.execute(insert(Attempt), rows)


def test_recommendations_follow_depth_throughput_and_limits(
    rt: Runtime, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = rt.settings.model_copy(
        update={"scale_drain_s": 60.0, "slm_concurrency": 16, "frontier_concurrency": 8,
                "scale_slm_max": 4, "scale_frontier_min": 0}
    )  # fmt: skip
    _attempts(rt, "slm", 20, 400)  # one slm worker: 16 / 0.4 s = 40 jobs/s
    _attempts(rt, "frontier", 10, 4000)  # one frontier worker: 8 / 4 s = 2 jobs/s
    celery = rt.celery
    for _ in range(300):
        celery.send_task(C.TASK_ATTEMPT, args=["f", "frontier"], queue=s.queue_frontier)
    with redis.Redis.from_url(redis_url) as r:
        pipe = r.pipeline()
        for i in range(20_000):
            pipe.rpush(s.queue_slm, f"m{i}")
        pipe.execute()
        reading = queue_depth.read(s, rt.ledger, r, vllm=False)
    recs = {x.pool: x for x in scale.recommend(s, rt.ledger, reading)}

    assert recs["slm"].per_worker_jobs_per_s == pytest.approx(40)
    # 20,000 / (40 jobs/s * 60 s) = 8.33 -> 9 wanted, capped at the max of 4
    assert (recs["slm"].wanted, recs["slm"].replicas) == (math.ceil(20_000 / 2400), 4)
    assert recs["frontier"].per_worker_jobs_per_s == pytest.approx(2)
    assert (recs["frontier"].wanted, recs["frontier"].replicas) == (3, 3)  # 300 / 120
    assert (recs["triage"].depth, recs["triage"].replicas) == (0, s.scale_triage_min)

    with redis.Redis.from_url(redis_url) as r:
        r.delete(s.queue_frontier)
        idle = queue_depth.read(s, rt.ledger, r, vllm=False)
    recs = {x.pool: x for x in scale.recommend(s, rt.ledger, idle)}
    assert recs["frontier"].replicas == 0  # the API pool scales to zero

    monkeypatch.setenv("TIERFLEET_SCALE_DRAIN_S", "60")
    monkeypatch.setenv("TIERFLEET_SLM_CONCURRENCY", "16")
    monkeypatch.setenv("TIERFLEET_SCALE_SLM_MAX", "4")
    result = CliRunner().invoke(app, ["scale", "--json"])
    assert result.exit_code == 0, result.output
    assert {r["pool"]: r["replicas"] for r in json.loads(result.stdout)}["slm"] == 4


def test_depth_and_replicas_reach_dogstatsd(
    rt: Runtime, redis_url: str, statsd: StatsdListener
) -> None:
    s = rt.settings
    for _ in range(7):
        rt.celery.send_task(C.TASK_TRIAGE, args=["j"], queue=s.queue_triage)
    metrics = Metrics.from_settings(s)
    with redis.Redis.from_url(redis_url) as r:
        reading = queue_depth.read(s, rt.ledger, r, vllm=False)
    queue_depth.publish(reading, metrics)
    scale.publish(scale.recommend(s, rt.ledger, reading), metrics)
    metrics.close()

    def gauges() -> dict[tuple[str, str], float]:
        return {
            (name, tags.get("queue", "")): value
            for name, value, kind, tags in statsd.metrics()
            if kind == "g"
        }

    wait_until(lambda: (C.METRIC_REPLICAS_WANTED, "tier.frontier") in gauges(), timeout_s=5,
               what="the gauges")  # fmt: skip
    seen = gauges()
    assert seen[(C.METRIC_QUEUE_DEPTH, s.queue_triage)] == 7
    assert seen[(C.METRIC_QUEUE_UNACKED, s.queue_slm)] == 0
    assert (C.METRIC_QUEUE_OLDEST_S, s.queue_frontier) in seen
    assert seen[(C.METRIC_REPLICAS_WANTED, s.queue_triage)] >= 1
