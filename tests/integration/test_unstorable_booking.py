"""A paid answer the ledger refuses to book as it is, on the real Postgres: the attempt is
booked as an invalid answer, with its real usage and cost and the reason, and the job
goes on (escalated, or failed on the top rung); never left `running` for a lapsed lease.
The log names the job and the error's class, never what the answer said."""

from __future__ import annotations

import logging
from decimal import Decimal

import pytest
from sqlalchemy import select

from tests.integration.test_budgets import set_cap
from tests.integration.test_steps import new_job, script
from tierfleet.constants import JobStatus, Outcome
from tierfleet.envelope import parse_envelope
from tierfleet.models import Attempt, Job
from tierfleet.prices import Usage
from tierfleet.store import insert_job
from workers import execute, storable
from workers.backends.base import Completion
from workers.execute import Next, attempt_job, triage_job
from workers.runtime import Runtime

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

SECRET_WORDS = "the answer's own words"
NUL_TEXT = Completion(f"{SECRET_WORDS}\x00", Usage(50, 8), "stop")


def plain_job(rt: Runtime, route: str) -> str:
    """A job without an output schema: its result is the answer's text."""
    spec = parse_envelope({"feature": "reviews", "prompt": "Say something", "route": route})
    with rt.ledger.session() as s:
        job_id, _ = insert_job(s, spec)
    triage_job(rt, job_id)
    return job_id


def ledger_view(rt: Runtime, job_id: str) -> tuple[Job, list[Attempt]]:
    with rt.ledger.session() as s:
        job = s.get_one(Job, job_id)
        rows = s.execute(select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.seq))
        return job, list(rows.scalars())


@pytest.fixture
def check_missed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The storability check misses it: the ledger's own refusal is what is left."""
    monkeypatch.setattr(storable, "unstorable", lambda _result: None)


@pytest.mark.parametrize("path", ["one-statement", "transaction"])
@pytest.mark.usefixtures("check_missed")
def test_an_answer_the_ledger_refuses_is_booked_invalid_with_its_cost(
    rt: Runtime, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    if path == "transaction":
        rt.budgets.refresh_s = 0.0
        set_cap("feature:reviews", "1000")  # a budget to add to: booked in a transaction
    job_id = plain_job(rt, "slm")
    backend = script(rt, "slm", NUL_TEXT)
    with caplog.at_level(logging.DEBUG):
        assert attempt_job(rt, job_id, "slm") == Next("frontier")

    job, [attempt] = ledger_view(rt, job_id)
    assert backend.calls == 1
    assert (job.status, job.tier, job.lease_until) == (JobStatus.TRIAGED, "frontier", None)
    assert attempt.outcome == Outcome.INVALID
    refused_as = "the answer cannot be stored: the ledger refused it (DataError: "
    assert attempt.error is not None and attempt.error.startswith(refused_as)
    cost = rt.prices[rt.settings.model_for("slm")].cost_usd(NUL_TEXT.usage)
    assert attempt.cost_usd == job.cost_usd == cost > 0
    assert (attempt.input_tokens, attempt.output_tokens) == (50, 8)
    refused = [r for r in caplog.records if getattr(r, "action", "") == "attempt.refused"]
    assert [r.__dict__["job_id"] for r in refused] == [job_id]
    assert refused[0].__dict__["error_class"].startswith("DataError: ")
    assert SECRET_WORDS not in caplog.text


@pytest.mark.usefixtures("check_missed")
def test_on_the_top_rung_a_refused_answer_fails_the_job_with_the_reason(rt: Runtime) -> None:
    job_id = plain_job(rt, "frontier")
    script(rt, "frontier", NUL_TEXT)
    steps = [attempt_job(rt, job_id, "frontier")]
    while steps[-1] is not None:
        steps.append(attempt_job(rt, job_id, steps[-1].tier))

    job, attempts = ledger_view(rt, job_id)
    assert job.status == JobStatus.FAILED
    assert job.error is not None and "ledger refused it (DataError: " in job.error
    assert [a.outcome for a in attempts] == [Outcome.INVALID] * rt.settings.frontier_max_attempts
    assert all(a.cost_usd > 0 for a in attempts)
    assert job.cost_usd == sum((a.cost_usd for a in attempts), Decimal(0))


def test_a_validator_that_raises_is_an_invalid_answer_booked_with_its_cost(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever the validator raises (a bug, a library's edge), the paid answer is booked
    as invalid with the reason and the job escalates; the log names the error's class."""

    def broken(*_args: object, **_kwargs: object) -> None:
        raise KeyError(SECRET_WORDS)

    monkeypatch.setattr(execute, "validate", broken)
    job_id = plain_job(rt, "slm")
    script(rt, "slm", Completion("fine", Usage(50, 8), "stop"))
    with caplog.at_level(logging.DEBUG):
        assert attempt_job(rt, job_id, "slm") == Next("frontier")

    job, [attempt] = ledger_view(rt, job_id)
    assert (job.status, attempt.outcome) == (JobStatus.TRIAGED, Outcome.INVALID)
    assert attempt.error is not None and "could not be validated: KeyError" in attempt.error
    assert attempt.cost_usd == job.cost_usd > 0
    raised = [r for r in caplog.records if getattr(r, "action", "") == "attempt.validation_error"]
    assert [r.__dict__["error_class"] for r in raised] == ["KeyError"]
    assert SECRET_WORDS not in caplog.text


@pytest.mark.parametrize(
    "finish_reason", ["stop\x00", "x" * 500, "\ud800"], ids=["nul", "long", "surrogate"]
)
def test_the_texts_of_an_attempt_row_are_made_storable(rt: Runtime, finish_reason: str) -> None:
    job_id = new_job(rt, route="slm")
    triage_job(rt, job_id)
    script(rt, "slm", Completion('{"label": "positive"}', Usage(50, 8), finish_reason))
    assert attempt_job(rt, job_id, "slm") is None

    job, [attempt] = ledger_view(rt, job_id)
    assert (job.status, attempt.outcome) == (JobStatus.SUCCEEDED, Outcome.SUCCEEDED)
    stored = attempt.finish_reason or ""
    assert 0 < len(stored) <= storable.MAX_FINISH_REASON_CHARS and "\x00" not in stored
    assert attempt.cost_usd == job.cost_usd > 0
