"""A bulk batch's spend cap, on the real Postgres: once the batch's attempts have cost the
cap, no new model call starts; its unstarted jobs end `cancelled` with the reason; calls
already in flight finish and are billed, so the overshoot is at most one call per worker
thread."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select

from producers import bulk
from producers.batches import status as batch_status
from producers.jsonl import open_input
from tests.integration.test_steps import GOOD, script
from tierfleet.constants import JobStatus, Outcome
from tierfleet.db import Ledger
from tierfleet.envelope import JobSpec
from tierfleet.models import Attempt, Batch, Job
from tierfleet.settings import Settings
from tierfleet.transport import make_celery
from workers.backends.base import Completion
from workers.execute import attempt_job, triage_job
from workers.runtime import Runtime

pytestmark = pytest.mark.integration


@pytest.fixture
def rt(settings: Settings, ledger: Ledger) -> Iterator[Runtime]:
    celery = make_celery(settings)
    runtime = Runtime.build(settings, celery, ledger)
    yield runtime
    celery.close()
    runtime.metrics.close()


def submit(rt: Runtime, tmp_path: Path, jobs: int, cap: Decimal | None) -> str:
    path = tmp_path / "jobs.jsonl"
    lines = (
        {"feature": "reviews", "prompt": f"Sentiment {i}: 'ok'", "output_schema": "sentiment",
         "route": "slm"}
        for i in range(jobs)
    )  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with open_input(str(path)) as source:
        report = bulk.submit(
            source,
            bulk.BatchOptions(spend_cap_usd=cap),
            rt.ledger,
            rt.celery,
            rt.settings.queue_triage,
        )
    assert report.written == jobs
    return report.batch_id


def job_ids(rt: Runtime, batch_id: str) -> list[str]:
    with rt.ledger.session() as s:
        query = select(Job.id).where(Job.batch_id == batch_id).order_by(Job.line)
        return list(s.execute(query).scalars())


def one_call_usd(rt: Runtime) -> Decimal:
    return rt.prices[rt.settings.model_for("slm")].cost_usd(GOOD.usage)


def test_no_call_starts_once_the_batch_has_spent_its_cap(rt: Runtime, tmp_path: Path) -> None:
    per_call = one_call_usd(rt)
    assert per_call > 0
    cap = per_call * 2 + Decimal("0.00000001")  # the third call crosses it
    batch_id = submit(rt, tmp_path, 6, cap)
    backend = script(rt, "slm", GOOD)
    ids = job_ids(rt, batch_id)
    for job_id in ids:
        triage_job(rt, job_id)
        assert attempt_job(rt, job_id, "slm") is None

    assert backend.calls == 3
    with rt.ledger.session() as s:
        jobs = {j.id: j for j in s.execute(select(Job).where(Job.batch_id == batch_id)).scalars()}
        batch = s.get_one(Batch, batch_id)
        billed = s.execute(
            select(func.sum(Attempt.cost_usd)).join(Job).where(Job.batch_id == batch_id)
        ).scalar_one()
    assert [jobs[i].status for i in ids] == [JobStatus.SUCCEEDED] * 3 + [JobStatus.CANCELLED] * 3
    for job_id in ids[3:]:
        error = jobs[job_id].error or ""
        assert "spend cap" in error and f"of ${cap})" in error
        assert jobs[job_id].attempt_count == 0 and jobs[job_id].cost_usd == 0
    assert batch.spent_usd == billed == 3 * per_call

    shown = batch_status(rt.ledger, batch_id)
    assert shown.spend_usd == 3 * per_call and shown.spend_cap_usd == cap
    assert shown.by_status == {"succeeded": 3, "cancelled": 3} and shown.finished


def test_a_batch_without_a_cap_keeps_no_running_spend(rt: Runtime, tmp_path: Path) -> None:
    batch_id = submit(rt, tmp_path, 3, None)
    script(rt, "slm", GOOD)
    for job_id in job_ids(rt, batch_id):
        triage_job(rt, job_id)
        attempt_job(rt, job_id, "slm")
    with rt.ledger.session() as s:
        assert s.get_one(Batch, batch_id).spent_usd == 0  # no write to the batch's row
        done = s.execute(
            select(func.count()).where(Job.batch_id == batch_id, Job.status == "succeeded")
        )
        assert done.scalar_one() == 3


class Gate:
    """A backend whose calls wait until `release` (so that many are in flight at once)."""

    def __init__(self, rt: Runtime, threads: int) -> None:
        self.tier, self.model, self.provider = "slm", rt.settings.model_for("slm"), "scripted"
        self.calls = 0
        self._lock = threading.Lock()
        self.in_flight = threading.Barrier(threads)

    def complete(self, job: JobSpec, *, timeout_s: float) -> Completion:
        with self._lock:
            self.calls += 1
            first_round = self.calls <= self.in_flight.parties
        if first_round:
            self.in_flight.wait(timeout=30)  # all threads' first calls in flight together
        return GOOD


def test_concurrent_workers_overshoot_the_cap_by_their_calls_in_flight_at_most(
    rt: Runtime, tmp_path: Path
) -> None:
    threads = 8
    per_call = one_call_usd(rt)
    cap = per_call * 4  # crossed while the first eight calls are in flight
    batch_id = submit(rt, tmp_path, 40, cap)
    ids = job_ids(rt, batch_id)
    for job_id in ids:
        triage_job(rt, job_id)
    gate = Gate(rt, threads)
    rt.backends["slm"] = gate
    todo = list(ids)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                job_id = todo.pop(0)
            attempt_job(rt, job_id, "slm")

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)

    with rt.ledger.session() as s:
        counts = dict(
            s.execute(
                select(Job.status, func.count())
                .where(Job.batch_id == batch_id)
                .group_by(Job.status)
            ).all()
        )
        spent = s.get_one(Batch, batch_id).spent_usd
        answered = s.execute(
            select(func.count())
            .select_from(Attempt)
            .join(Job)
            .where(Job.batch_id == batch_id, Attempt.outcome == Outcome.SUCCEEDED)
        ).scalar_one()
    # every call was billed once; calls in flight when the cap was crossed finished, and
    # none started after: the overshoot is at most one call per worker thread
    assert gate.calls == answered >= threads
    assert counts == {JobStatus.SUCCEEDED: answered, JobStatus.CANCELLED: len(ids) - answered}
    assert spent == answered * per_call
    assert cap <= spent <= cap + threads * per_call
