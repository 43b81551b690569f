"""Durability under real breakage: a worker SIGKILLed mid-call, Redis losing everything
mid-batch, Postgres gone for ten seconds, messages nobody can run. Real worker processes,
real Redis and Postgres; the reconciler runs on beat with a short interval."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection
from sqlalchemy import func, select, text

from producers import Client, bulk
from producers.jsonl import open_input
from tests.chaos.proxy import TcpProxy
from tests.conftest import Workers, wait_until
from tests.e2e.test_fleet import all_terminal
from tests.fakes import Answer, Hang
from tierfleet import constants as C
from tierfleet.constants import JobStatus, Outcome
from tierfleet.db import Ledger
from tierfleet.models import Attempt, DeadLetter, Job
from tierfleet.settings import Settings
from tierfleet.transport import make_celery

pytestmark = pytest.mark.chaos

# Fast clocks: a lapsed lease or a lost message is noticed within a few seconds.
FAST = {
    "TIERFLEET_LEASE_GRACE_S": "1",
    "TIERFLEET_RECONCILE_INTERVAL_S": "0.5",
    "TIERFLEET_STALE_AFTER_S": "2",
}


def statuses(ledger: Ledger) -> Counter[str]:
    with ledger.session() as s:
        return Counter(s.execute(select(Job.status)).scalars())


def attempts_of(ledger: Ledger, job_id: str) -> list[Attempt]:
    with ledger.session() as s:
        query = select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.seq)
        return list(s.execute(query).scalars())


def test_a_worker_killed_mid_call_is_replaced_and_its_attempt_marked_abandoned(
    client: Client,
    ledger: Ledger,
    fake_vllm: Any,
    real_env: dict[str, str],
    start_workers: Callable[..., Workers],
) -> None:
    env = {
        **real_env,
        **FAST,
        "TIERFLEET_SLM_TIMEOUT_BASE_S": "3",
        "TIERFLEET_SLM_TIMEOUT_PER_TOKEN_S": "0",
    }
    fake_vllm.when("[case killed]", Hang(60), Answer())
    start_workers("triage", TIERFLEET_BEAT="1", **env)
    doomed = start_workers("slm", concurrency=2, **env)
    job_id = client.submit(
        {
            "feature": "reviews",
            "prompt": "[case killed] Sentiment of 'ok'",
            "output_schema": "sentiment",
            "route": "slm",
        }
    )
    wait_until(lambda: fake_vllm.in_flight == 1, timeout_s=30, what="the call in flight")
    os.kill(doomed.procs[0].pid, signal.SIGKILL)
    doomed.procs[0].wait()
    replacement = start_workers("slm", concurrency=2, **env)

    wait_until(
        lambda: statuses(ledger)[JobStatus.SUCCEEDED] == 1,
        timeout_s=60,
        what=f"the job to succeed on the replacement\n{replacement.output()[-3000:]}",
    )
    attempts = attempts_of(ledger, job_id)
    assert [(a.seq, a.outcome) for a in attempts] == [
        (1, Outcome.ABANDONED),
        (2, Outcome.SUCCEEDED),
    ]
    abandoned, succeeded = attempts
    assert abandoned.cost_usd == 0 and "lost mid-call" in (abandoned.error or "")
    assert succeeded.cost_usd > 0
    # two real calls reached the model; the one whose answer arrived is billed, once
    marked = [r for r in fake_vllm.requests if "[case killed]" in fake_vllm.prompt_text(r.body)]
    assert len(marked) == 2
    with ledger.session() as s:
        job = s.get_one(Job, job_id)
    assert job.cost_usd == succeeded.cost_usd and job.attempt_count == 2


def _write_jobs(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(
                json.dumps(
                    {
                        "feature": "reviews",
                        "prompt": f"Review {i}: fine",
                        "output_schema": "sentiment",
                        "max_tokens": 64,
                    }
                )
                + "\n"
            )
    return path


def test_redis_losing_everything_mid_batch_loses_no_job(
    settings: Settings,
    ledger: Ledger,
    redis_url: str,
    fleet_env: dict[str, str],
    start_workers: Callable[..., Workers],
    tmp_path: Path,
) -> None:
    env = {**FAST, "TIERFLEET_SIM_LATENCY_S": "0.02"}
    start_workers("triage", TIERFLEET_BEAT="1", **env)
    tiers = start_workers("slm", "frontier", concurrency=4, **env)
    celery = make_celery(settings)
    with open_input(str(_write_jobs(tmp_path / "jobs.jsonl", 1000))) as source:
        report = bulk.submit(source, bulk.BatchOptions(), ledger, celery, settings.queue_triage)
    celery.close()
    assert report.written == 1000

    wait_until(
        lambda: sum(n for s, n in statuses(ledger).items() if JobStatus(s).terminal) >= 100,
        timeout_s=60,
        what="a tenth of the batch done",
    )
    with redis.Redis.from_url(redis_url) as r:
        lost = r.llen(settings.queue_slm) + r.llen(settings.queue_triage) + r.hlen("unacked")
        r.flushdb()  # every queue, every unacked message: gone
    done_at_flush = sum(n for s, n in statuses(ledger).items() if JobStatus(s).terminal)
    assert done_at_flush < 1000 and lost > 0, "the flush came too late to lose anything"

    wait_until(
        lambda: all_terminal(ledger, 1000),
        timeout_s=120,
        what=f"all 1,000 jobs terminal: {statuses(ledger)}\n{tiers.output()[-2000:]}",
    )
    assert statuses(ledger) == {JobStatus.SUCCEEDED: 1000}
    with ledger.session() as s:
        per_job = s.execute(
            select(Attempt.job_id, func.count())
            .where(Attempt.outcome == Outcome.SUCCEEDED)
            .group_by(Attempt.job_id)
        ).all()
        billed = s.execute(select(func.sum(Attempt.cost_usd))).scalar_one()
        charged = s.execute(select(func.sum(Job.cost_usd))).scalar_one()
    assert len(per_job) == 1000 and all(n == 1 for _, n in per_job)  # no job answered twice
    assert billed == charged


def test_postgres_away_for_ten_seconds_loses_nothing(
    client: Client,
    ledger: Ledger,
    database_url: str,
    fake_vllm: Any,
    fake_anthropic: Any,
    real_env: dict[str, str],
    start_workers: Callable[..., Workers],
) -> None:
    fake_vllm.latency_s = fake_anthropic.latency_s = 0.3
    host_port = database_url.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1) if ":" in host_port else (host_port, "5432")
    with TcpProxy(host, int(port)) as proxy:
        via_proxy = database_url.replace(f"@{host_port}/", f"@127.0.0.1:{proxy.port}/")
        env = {**real_env, **FAST, "DATABASE_URL": via_proxy}
        start_workers("triage", TIERFLEET_BEAT="1", **env)
        tiers = start_workers("slm", "frontier", concurrency=8, **env)
        ids = [
            client.submit(
                {"feature": "reviews", "prompt": f"Review {i}: fine", "output_schema": "sentiment"}
            )
            for i in range(60)
        ]
        wait_until(
            lambda: statuses(ledger)[JobStatus.RUNNING] >= 4,
            timeout_s=30,
            what="model calls in flight",
        )
        proxy.cut()  # every connection dropped, new ones refused
        outage_started = statuses(ledger)
        wait_until(
            lambda: "ledger unavailable" in tiers.output(),
            timeout_s=30,
            what="a worker to notice the outage",
        )
        proxy.wait_cut(10.0)
        proxy.restore()
        wait_until(
            lambda: all_terminal(ledger, len(ids)),
            timeout_s=120,
            what=f"all jobs terminal after the outage: {statuses(ledger)}",
        )
    assert outage_started[JobStatus.SUCCEEDED] < len(ids)
    assert statuses(ledger) == {JobStatus.SUCCEEDED: len(ids)}
    # no session cut off mid-transaction lives on holding its locks
    wait_until(
        lambda: _stuck_in_transaction(ledger) == 0,
        timeout_s=10,
        what="no session idle in a transaction after the outage",
    )
    with ledger.session() as s:
        outcomes = Counter(s.execute(select(Attempt.outcome)).scalars())
        billed = s.execute(select(func.sum(Attempt.cost_usd))).scalar_one()
        charged = s.execute(select(func.sum(Job.cost_usd))).scalar_one()
    # answers held through the outage were booked, not thrown away and asked for again:
    # one attempt row for every request the models answered
    requests = len(fake_vllm.requests) + len(fake_anthropic.requests)
    assert sum(outcomes.values()) == requests and outcomes[Outcome.ABANDONED] == 0, outcomes
    assert billed == charged


def _stuck_in_transaction(ledger: Ledger) -> int:
    with ledger.engine.connect() as conn:
        query = text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state = 'idle in transaction' AND pid <> pg_backend_pid()"
        )
        return int(conn.execute(query).scalar_one())


def _publish_raw(redis_url: str, queue: str, body: bytes, content_type: str) -> None:
    with Connection(redis_url) as conn:
        producer = conn.Producer()
        producer.publish(
            body,
            routing_key=queue,
            content_type=content_type,
            content_encoding="utf-8",
            headers={"task": C.TASK_TRIAGE, "id": "poison-1"},
            declare=[],
        )


def test_undecodable_and_unknown_messages_are_dead_lettered_and_do_not_block(
    client: Client,
    ledger: Ledger,
    redis_url: str,
    settings: Settings,
    start_workers: Callable[..., Workers],
) -> None:
    _publish_raw(redis_url, settings.queue_triage, b"\xff\xfe{not json", "application/json")
    _publish_raw(
        redis_url, settings.queue_triage, b"\x80\x04K\x01.", "application/x-python-serialize"
    )
    celery = make_celery(settings)
    celery.send_task("tierfleet.no_such_task", args=["x"], queue=settings.queue_triage)
    celery.close()
    ids = [
        client.submit(
            {"feature": "reviews", "prompt": f"Review {i}: fine", "output_schema": "sentiment"}
        )
        for i in range(10)
    ]
    workers = start_workers("triage", "slm", "frontier", concurrency=2, **FAST)
    wait_until(
        lambda: all_terminal(ledger, len(ids)),
        timeout_s=60,
        what=f"the jobs behind the bad messages\n{workers.output()[-2000:]}",
    )
    with ledger.session() as s:
        wait_until(
            lambda: s.execute(select(func.count()).select_from(DeadLetter)).scalar_one() == 3,
            timeout_s=10,
            what="three dead letters",
        )
        letters = s.execute(select(DeadLetter).order_by(DeadLetter.id)).scalars().all()
    reasons = Counter(d.reason for d in letters)
    assert reasons == {"undecodable": 1, "invalid_task": 1, "unknown_task": 1}
    by_reason = {d.reason: d for d in letters}
    assert "not json" in (by_reason["undecodable"].body or "")
    assert "application/x-python-serialize" in by_reason["invalid_task"].error
    assert "tierfleet.no_such_task" in by_reason["unknown_task"].error
    assert all(d.queue == settings.queue_triage for d in letters)


POISON_SCORER = "tests.chaos.poison:PoisonScorer"


def test_a_job_that_crashes_its_step_every_time_is_dead_lettered_with_its_traceback(
    client: Client,
    ledger: Ledger,
    start_workers: Callable[..., Workers],
) -> None:
    workers = start_workers(
        "triage",
        "slm",
        "frontier",
        concurrency=2,
        TIERFLEET_TRIAGE_SCORER=POISON_SCORER,
        TIERFLEET_MAX_TASK_ERRORS="3",
        **FAST,
    )
    poison = client.submit({"feature": "reviews", "prompt": "[poison] Sentiment of 'ok'"})
    fine = [client.submit({"feature": "reviews", "prompt": f"Review {i}"}) for i in range(5)]
    wait_until(
        lambda: all_terminal(ledger, 6),
        timeout_s=60,
        what=f"every job terminal\n{workers.output()[-2000:]}",
    )
    with ledger.session() as s:
        job = s.get_one(Job, poison)
        others = [s.get_one(Job, i).status for i in fine]
        letter = s.execute(select(DeadLetter).where(DeadLetter.job_id == poison)).scalar_one()
    assert job.status == JobStatus.FAILED and "dead letter after 3 tries" in (job.error or "")
    assert others == [JobStatus.SUCCEEDED] * 5
    assert letter.reason == "errors" and letter.tries == 3
    assert "PoisonError" in (letter.traceback or "") and "poison.py" in (letter.traceback or "")


def test_a_job_that_kills_its_worker_every_time_is_dead_lettered(
    client: Client,
    ledger: Ledger,
    fake_vllm: Any,
    real_env: dict[str, str],
    start_workers: Callable[..., Workers],
) -> None:
    """Each time the call is in flight the worker dies (SIGKILL, as an OOM kill would);
    after `max_worker_losses` the job stops being run and is dead-lettered."""
    env = {
        **real_env,
        **FAST,
        "TIERFLEET_SLM_TIMEOUT_BASE_S": "3",
        "TIERFLEET_SLM_TIMEOUT_PER_TOKEN_S": "0",
        "TIERFLEET_MAX_WORKER_LOSSES": "2",
    }
    fake_vllm.when("[case deadly]", Hang(60), Hang(60), Hang(60))
    start_workers("triage", TIERFLEET_BEAT="1", **env)
    job_id = client.submit(
        {
            "feature": "reviews",
            "prompt": "[case deadly] Sentiment of 'ok'",
            "output_schema": "sentiment",
            "route": "slm",
        }
    )
    for n in (1, 2):
        slm = start_workers("slm", concurrency=1, **env)
        wait_until(lambda n=n: len(fake_vllm.requests) == n, timeout_s=30, what=f"call {n}")
        os.kill(slm.procs[0].pid, signal.SIGKILL)
        slm.procs[0].wait()
    last = start_workers("slm", concurrency=1, **env)
    wait_until(
        lambda: all_terminal(ledger, 1),
        timeout_s=60,
        what=f"the job dead-lettered\n{last.output()[-2000:]}",
    )
    with ledger.session() as s:
        job = s.get_one(Job, job_id)
        letter = s.execute(select(DeadLetter).where(DeadLetter.job_id == job_id)).scalar_one()
    assert job.status == JobStatus.FAILED and "lost 2 times" in (job.error or "")
    assert letter.reason == "worker_lost" and letter.tries == 2
    assert [a.outcome for a in attempts_of(ledger, job_id)] == [Outcome.ABANDONED] * 2
    assert len(fake_vllm.requests) == 2  # not called a third time
