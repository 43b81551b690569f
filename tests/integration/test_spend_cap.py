"""A bulk batch's spend cap, on the real Postgres: once the batch's attempts have cost the
cap, no new model call starts; its unstarted jobs end `cancelled` with the reason; calls
already in flight finish and are billed, so the overshoot is at most one call per worker
thread."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select

from producers import bulk
from producers.batches import status as batch_status
from producers.jsonl import open_input
from tests.integration.test_steps import GOOD, InFlightTogether, attempt_concurrently, script
from tierfleet.constants import JobStatus, Outcome
from tierfleet.models import Attempt, Batch, Job
from workers.execute import attempt_job, triage_job
from workers.runtime import Runtime

pytestmark = pytest.mark.integration


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
    gate = InFlightTogether(rt, "slm", threads)
    rt.backends["slm"] = gate
    attempt_concurrently(rt, ids, "slm", threads)

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
