"""A commit whose reply never comes back: the ledger has the transaction, the worker sees
the connection drop (Postgres restarted, a network cut at the wrong moment). The worker
waits the outage out and tries again; the try must find its own landed commit, not book
the attempt twice, not charge the job twice, and not take its own lease for a lost
worker's."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import Connection, event, select, update
from sqlalchemy.exc import OperationalError

from tests.integration.test_leases import DuringCall
from tests.integration.test_steps import BAD, GOOD, new_job, script
from tierfleet.constants import JobStatus, Outcome
from tierfleet.models import Attempt, Job
from workers import sql
from workers.execute import Next, attempt_job, triage_job
from workers.runtime import Runtime

pytestmark = pytest.mark.integration


def _reset() -> OperationalError:
    return OperationalError("COMMIT", None, ConnectionResetError("connection reset"))


class ReplyLost:
    """Wraps `rt.ledger.begin` and `rt.ledger.autocommit`: the first transaction that runs
    `statement` commits (in autocommit, the statement itself), and then its caller gets
    the error a dropped connection raises."""

    def __init__(self, rt: Runtime, statement: Any) -> None:
        self.statement, self.lost = statement, 0
        self._begin, self._autocommit = rt.ledger.begin, rt.ledger.autocommit
        rt.ledger.begin = self.begin  # type: ignore[method-assign]
        rt.ledger.autocommit = self.autocommit  # type: ignore[method-assign]

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        def landed(_conn: Any, clause: Any, *_args: Any) -> None:
            if not self.lost and clause is self.statement:
                self.lost += 1
                raise _reset()

        with self._autocommit() as conn:
            event.listen(conn, "after_execute", landed)
            yield conn

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        ran: list[Any] = []

        def seen(_conn: Any, clause: Any, *_args: Any) -> None:
            ran.append(clause)

        with self._begin() as conn:
            event.listen(conn, "before_execute", seen)
            yield conn
        if not self.lost and any(c is self.statement for c in ran):
            self.lost += 1
            raise _reset()


def _ledger(rt: Runtime, job_id: str) -> tuple[Job, list[Attempt]]:
    with rt.ledger.session() as s:
        job = s.get_one(Job, job_id)
        rows = list(s.execute(select(Attempt).where(Attempt.job_id == job_id)).scalars())
    return job, rows


@pytest.mark.parametrize(
    ("lost", "answer", "after"),
    [
        (sql.CLAIM_TRIAGED, GOOD, (None, JobStatus.SUCCEEDED, "slm")),
        # on PostgreSQL an attempt is booked in one statement with its job's change
        (sql.BOOKING[sql.RECORD_SUCCEEDED], GOOD, (None, JobStatus.SUCCEEDED, "slm")),
        (sql.BOOKING[sql.RECORD_ESCALATED], BAD, (Next("frontier"), JobStatus.TRIAGED, "frontier")),
    ],
    ids=["claim", "booking-succeeded", "booking-escalated"],
)
def test_a_commit_whose_reply_was_lost_is_found_not_repeated(
    rt: Runtime, lost: Any, answer: Any, after: tuple[Next | None, JobStatus, str]
) -> None:
    job_id = new_job(rt, route="slm")
    triage_job(rt, job_id)
    backend = script(rt, "slm", answer)
    cut = ReplyLost(rt, lost)
    step = attempt_job(rt, job_id, "slm")
    assert cut.lost == 1  # the reply was lost, and the worker went on
    job, rows = _ledger(rt, job_id)
    assert (step, job.status, job.tier) == after
    assert backend.calls == 1
    assert [r.outcome for r in rows] == [
        Outcome.SUCCEEDED if answer is GOOD else Outcome.INVALID
    ]  # one attempt, none abandoned
    assert job.cost_usd == rows[0].cost_usd > 0  # charged once
    assert job.lease_until is None and job.attempt_count == 1


def test_a_fenced_booking_whose_reply_was_lost_is_charged_once(rt: Runtime) -> None:
    job_id = new_job(rt, route="slm")
    triage_job(rt, job_id)

    def lease_lapses_and_another_worker_takes_over() -> None:
        with rt.ledger.begin() as conn:
            past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            conn.execute(update(Job).where(Job.id == job_id).values(lease_until=past))
        script(rt, "slm", GOOD)
        assert attempt_job(rt, job_id, "slm") is None
        rt.backends["slm"] = zombie
        ReplyLost(rt, sql.ADD_COST)  # the zombie's booking: fenced, and its reply lost

    zombie = DuringCall(rt, lease_lapses_and_another_worker_takes_over)
    rt.backends["slm"] = zombie
    assert attempt_job(rt, job_id, "slm") is None
    job, rows = _ledger(rt, job_id)
    assert sorted(r.outcome for r in rows) == [Outcome.ABANDONED, Outcome.SUCCEEDED]
    assert job.status == JobStatus.SUCCEEDED
    assert job.cost_usd == sum(r.cost_usd for r in rows) and all(r.cost_usd > 0 for r in rows)
