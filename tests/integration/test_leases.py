"""Leases on running jobs and the reconciler, step by step on the real Postgres and Redis.

A redelivered message must not call the model again while the job's worker is alive; a
worker that outlives its lease must not apply its answer over its successor's; the
reconciler must re-drive what was lost, and only that."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from sqlalchemy import select, update

from tests.conftest import StatsdListener, wait_until
from tests.integration.test_steps import GOOD, ScriptedBackend, new_job, script
from tierfleet import constants as C
from tierfleet.constants import JobStatus, Outcome
from tierfleet.envelope import JobSpec
from tierfleet.models import Attempt, Batch, Job
from workers import holding
from workers.backends.base import Completion
from workers.broker import held
from workers.execute import attempt_job, triage_job
from workers.reconcile import reconcile
from workers.runtime import Runtime

pytestmark = pytest.mark.integration


class DuringCall(ScriptedBackend):
    """Runs `during()` while the call is in flight, then answers GOOD."""

    def __init__(self, rt: Runtime, during: Callable[[], Any]) -> None:
        super().__init__("slm", rt.settings.model_for("slm"), [GOOD])
        self.during = during

    def complete(self, job: JobSpec, *, timeout_s: float) -> Completion:
        self.during()
        return super().complete(job, timeout_s=timeout_s)


def attempts(rt: Runtime, job_id: str) -> list[Attempt]:
    with rt.ledger.session() as s:
        query = select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.seq)
        return list(s.execute(query).scalars())


def test_a_message_redelivered_while_its_worker_lives_does_not_call_again(rt: Runtime) -> None:
    job_id = new_job(rt, route="slm")
    triage_job(rt, job_id)
    inner: list[Any] = []
    backend = DuringCall(rt, lambda: inner.append(attempt_job(rt, job_id, "slm")))
    rt.backends["slm"] = backend
    assert attempt_job(rt, job_id, "slm") is None  # succeeded: nothing to send
    assert inner == [None] and backend.calls == 1  # the duplicate found a live lease
    assert [(a.seq, a.outcome) for a in attempts(rt, job_id)] == [(1, Outcome.SUCCEEDED)]


def test_a_worker_that_outlived_its_lease_records_but_does_not_apply(rt: Runtime) -> None:
    job_id = new_job(rt, route="slm")
    triage_job(rt, job_id)
    successor = ScriptedBackend("slm", rt.settings.model_for("slm"), [GOOD])

    def lease_lapses_and_another_worker_takes_over() -> None:
        with rt.ledger.begin() as conn:
            past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            conn.execute(update(Job).where(Job.id == job_id).values(lease_until=past))
        rt.backends["slm"] = successor
        assert attempt_job(rt, job_id, "slm") is None  # the successor finishes the job
        rt.backends["slm"] = zombie

    zombie = DuringCall(rt, lease_lapses_and_another_worker_takes_over)
    rt.backends["slm"] = zombie
    assert attempt_job(rt, job_id, "slm") is None  # fenced: no follow-up
    rows = attempts(rt, job_id)
    assert [(a.seq, a.outcome) for a in rows] == [(1, Outcome.ABANDONED), (2, Outcome.SUCCEEDED)]
    assert "after its lease lapsed" in (rows[0].error or "")
    assert rows[0].input_tokens == GOOD.usage.input_tokens and rows[0].cost_usd > 0
    with rt.ledger.session() as s:
        job = s.get_one(Job, job_id)
    assert job.status == JobStatus.SUCCEEDED and job.cost_usd == sum(a.cost_usd for a in rows)


def _age(rt: Runtime, job_id: str, seconds: float, **values: Any) -> None:
    then = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
    with rt.ledger.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(updated_at=then, **values))


def _queued(redis_url: str, queue: str) -> list[tuple[str, list[Any]]]:
    with redis.Redis.from_url(redis_url) as r:
        out = []
        for raw in r.lrange(queue, 0, -1):
            message = json.loads(raw)
            args = json.loads(base64.b64decode(message["body"]))[0]
            out.append((message["headers"]["task"], args))
        return out


def _run(rt: Runtime) -> dict[str, int]:
    from workers.tasks import send_attempt, send_triage

    return reconcile(rt, send_triage, send_attempt)


def test_the_reconciler_re_drives_lost_messages_once_per_deadline(
    rt: Runtime, redis_url: str, statsd: StatsdListener
) -> None:
    stale = rt.settings.stale_after_s + 1
    lost_queued = new_job(rt)
    lost_triaged = new_job(rt, route="slm")
    triage_job(rt, lost_triaged)
    fresh = new_job(rt)
    _age(rt, lost_queued, stale)
    _age(rt, lost_triaged, stale)

    assert _run(rt) == {"running": 0, "queued": 1, "triaged": 1}
    assert _queued(redis_url, rt.settings.queue_triage) == [(C.TASK_TRIAGE, [lost_queued])]
    assert _queued(redis_url, rt.settings.queue_slm) == [(C.TASK_ATTEMPT, [lost_triaged, "slm"])]
    assert fresh not in str(_queued(redis_url, rt.settings.queue_triage))
    wait_until(
        lambda: {m[0] for m in statsd.metrics()} >= {C.METRIC_JOBS_REDRIVEN},
        timeout_s=5,
        what="the re-drive counted",
    )
    # at most once per deadline: the queues are drained again, yet nothing is sent
    with redis.Redis.from_url(redis_url) as r:
        r.delete(rt.settings.queue_triage, rt.settings.queue_slm)
    assert _run(rt) == {"running": 0, "queued": 0, "triaged": 0}


def test_a_backlog_is_not_a_loss(rt: Runtime, redis_url: str) -> None:
    waiting = new_job(rt)
    _age(rt, waiting, rt.settings.stale_after_s + 1)
    rt.celery.send_task(C.TASK_TRIAGE, args=["someone-else"], queue=rt.settings.queue_triage)
    assert _run(rt)["queued"] == 0  # its message may be behind the one in the queue


def _taken(r: redis.Redis, tag: str, job_id: str, queue: str, ago_s: float | None = None) -> None:
    """A triage message for `job_id` delivered `ago_s` ago and not acknowledged, as kombu
    records it (without `ago_s`: no delivery time recorded)."""
    body = base64.b64encode(json.dumps([[job_id], {}, {}]).encode()).decode()
    message = {
        "body": body,
        "headers": {"task": C.TASK_TRIAGE},
        "properties": {"body_encoding": "base64"},
    }
    r.hset(C.REDIS_UNACKED, tag, json.dumps([message, "", queue]))
    if ago_s is not None:
        r.zadd(C.REDIS_UNACKED_INDEX, {tag: time.time() - ago_s})


def test_a_job_held_unacked_by_a_worker_is_not_re_driven(rt: Runtime, redis_url: str) -> None:
    held = new_job(rt)
    _age(rt, held, rt.settings.stale_after_s + 1)
    with redis.Redis.from_url(redis_url) as r:
        _taken(r, "tag-1", held, rt.settings.queue_triage)
    assert _run(rt)["queued"] == 0


def test_a_message_whose_worker_is_gone_holds_its_job_no_longer(
    rt: Runtime, redis_url: str
) -> None:
    orphaned, alive, just_taken = new_job(rt), new_job(rt), new_job(rt)
    for job_id in (orphaned, alive, just_taken):
        _age(rt, job_id, rt.settings.stale_after_s + 1)
    queue = rt.settings.queue_triage
    with redis.Redis.from_url(redis_url) as r:
        _taken(r, "tag-orphaned", orphaned, queue, ago_s=600)  # its worker beats no more
        _taken(r, "tag-alive", alive, queue, ago_s=600)
        _taken(r, "tag-just-taken", just_taken, queue, ago_s=1)  # before its worker's beat
        live, gone = (C.REDIS_CONSUMER_PREFIX + name for name in ("host:1:a", "host:2:b"))
        r.sadd(C.REDIS_CONSUMERS, live, gone)  # the gone worker's key has expired
        r.set(live, json.dumps(["tag-alive"]), ex=holding.ALIVE_TTL_S)
    with redis.Redis.from_url(redis_url) as r:  # depth counts what live workers hold
        broker = held(r, [queue])
    assert (broker.unacked[queue], broker.orphaned[queue]) == (2, 1)
    assert _run(rt)["queued"] == 1
    assert _queued(redis_url, queue) == [(C.TASK_TRIAGE, [orphaned])]
    with redis.Redis.from_url(redis_url) as r:
        assert r.smembers(C.REDIS_CONSUMERS) == {live.encode()}  # the gone one forgotten
        assert r.hexists(C.REDIS_UNACKED, "tag-orphaned")  # left to kombu's own restore


def test_a_running_job_whose_lease_lapsed_is_re_driven_even_if_its_message_is_held(
    rt: Runtime, redis_url: str
) -> None:
    job_id = new_job(rt, route="slm")
    triage_job(rt, job_id)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    _age(rt, job_id, 10, status=JobStatus.RUNNING, leased_at=past, lease_until=past)
    with redis.Redis.from_url(redis_url) as r:  # the dead worker's message, never acked
        r.hset(C.REDIS_UNACKED, "tag-1", json.dumps([{"body": "", "headers": {}}, "", "x"]))
    assert _run(rt)["running"] == 1
    assert _queued(redis_url, rt.settings.queue_slm) == [(C.TASK_ATTEMPT, [job_id, "slm"])]
    assert _run(rt)["running"] == 0  # sent once: the claim, not the reconciler, moves it on
    script(rt, "slm", GOOD)
    attempt_job(rt, job_id, "slm")
    assert [a.outcome for a in attempts(rt, job_id)] == [Outcome.ABANDONED, Outcome.SUCCEEDED]


def test_a_batch_still_being_submitted_is_left_to_its_submit(rt: Runtime) -> None:
    job_id = new_job(rt)
    with rt.ledger.begin() as conn:
        conn.execute(Batch.__table__.insert().values(id="b-1", options={}, job_count=1))
        conn.execute(update(Job).where(Job.id == job_id).values(batch_id="b-1", line=1))
    _age(rt, job_id, rt.settings.stale_after_s + 1)
    assert _run(rt)["queued"] == 0  # enqueued_through is 0: the submit has not sent it
    with rt.ledger.begin() as conn:
        conn.execute(update(Batch).values(enqueued_through=1))
    assert _run(rt)["queued"] == 1
