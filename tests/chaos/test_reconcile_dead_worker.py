"""A worker SIGKILLed while it holds messages, delivered and not acknowledged: its jobs
go on long before kombu's visibility timeout (an hour) would put the messages back. Real
worker processes, real Redis and Postgres, the visibility timeout at its default; the
reconciler runs on beat with a short interval."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection
from sqlalchemy import func, select

from producers import Client, bulk
from producers.jsonl import open_input
from tests.chaos.test_durability import FAST, statuses
from tests.conftest import Workers, wait_until
from tests.e2e.test_fleet import all_terminal
from tests.fakes import Answer, Error
from tierfleet import constants as C
from tierfleet.constants import JobStatus
from tierfleet.db import Ledger
from tierfleet.models import Attempt, Job
from tierfleet.settings import Settings
from tierfleet.transport import make_celery

pytestmark = pytest.mark.chaos

HANG_SCORER = "tests.chaos.hang:HangScorer"
JOBS = 100  # one bulk chunk: one `triage_range` message
BOUND_S = 90.0  # far below the visibility timeout
RULES = {"TIERFLEET_TRIAGE_SCORER": "workers.triage:RuleScorer"}  # the hang's twin, no hang
BACKOFF_S = 30  # a restored retry still waits for its countdown: keep it short
DEBUG = {"TIERFLEET_LOG_LEVEL": "DEBUG"}  # a line per task run: "Task ...[id] succeeded"


@dataclass(frozen=True)
class Unacked:
    tag: str  # kombu's delivery tag
    task: str
    task_id: str
    args: list[Any]
    eta: str | None  # a countdown's: the worker holds the message until then


def _unacked(redis_url: str, task: str) -> list[Unacked]:
    """The messages of `task` delivered and not acknowledged, as kombu records them."""
    out = []
    with redis.Redis.from_url(redis_url) as r:
        for tag, raw in r.hgetall(C.REDIS_UNACKED).items():
            message = json.loads(raw)[0]
            headers, body = message["headers"], base64.b64decode(message["body"])
            if headers["task"] == task:
                args = json.loads(body)[0]
                out.append(Unacked(tag.decode(), task, headers["id"], args, headers.get("eta")))
    return out


def _ledger(ledger: Ledger) -> tuple[Counter[str], int, Decimal, Decimal]:
    """Job statuses, attempts recorded, spend booked on attempts and charged to jobs."""
    with ledger.session() as s:
        attempts = s.execute(select(func.count()).select_from(Attempt)).scalar_one()
        billed = s.execute(select(func.coalesce(func.sum(Attempt.cost_usd), 0))).scalar_one()
        charged = s.execute(select(func.coalesce(func.sum(Job.cost_usd), 0))).scalar_one()
    return statuses(ledger), attempts, billed, charged


def _restored_an_hour_later_changes_nothing(
    redis_url: str, ledger: Ledger, task_id: str, workers: Workers
) -> None:
    """What kombu does once the visibility timeout has passed, done now: the dead
    worker's message goes back on its queue, a live worker runs it, and the ledger is
    as it was."""
    before = _ledger(ledger)
    with Connection(redis_url, transport_options={"visibility_timeout": 0}) as conn:
        conn.default_channel.qos.restore_visible()
    wait_until(
        lambda: f"[{task_id}] succeeded" in workers.output(),
        timeout_s=BACKOFF_S + 30,
        what=f"the restored message run\n{workers.output()[-2000:]}",
    )
    assert _ledger(ledger) == before


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _kill_all(workers: Workers) -> None:
    """SIGKILL a worker and its pool processes, as the loss of its host or container."""
    main = workers.procs[0]
    for pid in [main.pid, *_children(main.pid)]:
        os.kill(pid, signal.SIGKILL)
    main.wait()


def _write_jobs(path: Path, n: int, hang_line: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            prompt = f"Review {i}: fine" + (" [hang]" if i == hang_line else "")
            job = {"feature": "reviews", "prompt": prompt, "output_schema": "sentiment"}
            f.write(json.dumps(job) + "\n")
    return path


def test_a_bulk_chunk_held_by_a_killed_triage_worker_does_not_stall_its_batch(
    settings: Settings,
    ledger: Ledger,
    redis_url: str,
    start_workers: Callable[..., Workers],
    tmp_path: Path,
) -> None:
    assert settings.visibility_timeout_s >= 3600  # kombu's restore cannot be what ends it
    start_workers("slm", "frontier", concurrency=4, **FAST)
    doomed = start_workers("triage", concurrency=1, TIERFLEET_TRIAGE_SCORER=HANG_SCORER, **FAST)
    celery = make_celery(settings)
    with open_input(str(_write_jobs(tmp_path / "jobs.jsonl", JOBS, hang_line=JOBS // 2))) as src:
        report = bulk.submit(src, bulk.BatchOptions(), ledger, celery, settings.queue_triage)
    celery.close()
    assert report.written == JOBS and report.chunks_enqueued == 1
    (dead,) = wait_until(
        lambda: _unacked(redis_url, C.TASK_TRIAGE_RANGE),
        timeout_s=60,
        what="the triage worker holding the chunk",
    )
    _kill_all(doomed)
    killed_at = time.monotonic()
    fresh = start_workers("triage", concurrency=2, TIERFLEET_BEAT="1", **FAST, **RULES, **DEBUG)

    wait_until(
        lambda: all_terminal(ledger, JOBS),
        timeout_s=BOUND_S,
        what=f"the batch to finish: {statuses(ledger)}\n{fresh.output()[-2000:]}",
    )
    took_s = time.monotonic() - killed_at
    assert statuses(ledger) == {JobStatus.SUCCEEDED: JOBS}
    assert _unacked(redis_url, C.TASK_TRIAGE_RANGE) == [dead]  # kombu has not restored it
    print(f"batch done {took_s:.1f} s after the kill")
    _restored_an_hour_later_changes_nothing(redis_url, ledger, dead.task_id, fresh)


def test_a_retry_held_by_a_killed_tier_worker_does_not_stall_its_job(
    client: Client,
    ledger: Ledger,
    redis_url: str,
    fake_vllm: Any,
    real_env: dict[str, str],
    start_workers: Callable[..., Workers],
) -> None:
    """The worker holds the job's next attempt, waiting out its backoff (half a minute)."""
    env = {
        **real_env,
        **FAST,
        "TIERFLEET_RETRY_BASE_DELAY_S": str(BACKOFF_S),
        "TIERFLEET_RETRY_MAX_DELAY_S": str(BACKOFF_S),
    }
    fake_vllm.when("[case backoff]", Error(503), Answer())
    start_workers("triage", TIERFLEET_BEAT="1", **env)
    doomed = start_workers("slm", concurrency=2, **env)
    job_id = client.submit(
        {
            "feature": "reviews",
            "prompt": "[case backoff] Sentiment of 'ok'",
            "output_schema": "sentiment",
            "route": "slm",
        }
    )

    def held_retry() -> list[Unacked]:  # only the countdown: the failed call's is acked
        held = _unacked(redis_url, C.TASK_ATTEMPT)
        return held if len(held) == 1 and held[0].eta else []

    (dead,) = wait_until(held_retry, timeout_s=60, what="the slm worker holding the retry")
    assert dead.args == [job_id, "slm"] and statuses(ledger) == {JobStatus.TRIAGED: 1}
    _kill_all(doomed)
    killed_at = time.monotonic()
    replacement = start_workers("slm", concurrency=2, **env, **DEBUG)

    wait_until(
        lambda: all_terminal(ledger, 1),
        timeout_s=BOUND_S,
        what=f"the job to finish: {statuses(ledger)}\n{replacement.output()[-2000:]}",
    )
    took_s = time.monotonic() - killed_at
    assert statuses(ledger) == {JobStatus.SUCCEEDED: 1}
    assert len(fake_vllm.requests) == 2  # the failed call, then one that answered
    assert _unacked(redis_url, C.TASK_ATTEMPT) == [dead]  # kombu has not restored it
    print(f"job done {took_s:.1f} s after the kill")
    _restored_an_hour_later_changes_nothing(redis_url, ledger, dead.task_id, replacement)
    assert len(fake_vllm.requests) == 2  # no call for the restored copy
