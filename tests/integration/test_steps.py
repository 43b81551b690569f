"""The worker's two steps (triage, attempt) on the real Postgres, with scripted backends.

No Celery here: each step returns the message it wants sent, and the tests check that
and the ledger."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest
from sqlalchemy import select

from tierfleet.constants import JobStatus, Outcome
from tierfleet.envelope import JobSpec, parse_envelope
from tierfleet.errors import ProviderOverloaded, ProviderTimeout, RateLimited
from tierfleet.models import Attempt, Job
from tierfleet.prices import Usage
from tierfleet.store import get_job, insert_job
from workers.backends.base import Completion
from workers.execute import Next, attempt_job, triage_job
from workers.runtime import Runtime

pytestmark = pytest.mark.integration

GOOD = Completion('{"label": "positive"}', Usage(50, 8), "stop")
BAD = Completion('{"label": "thrilled"}', Usage(50, 8), "stop")


class ScriptedBackend:
    """A `ModelBackend` that plays back answers or raises faults, in order."""

    def __init__(self, tier: str, model: str, script: list[Any]) -> None:
        self.tier, self.model, self.provider = tier, model, "scripted"
        self.script = script
        self.calls = 0

    def complete(self, job: JobSpec, *, timeout_s: float) -> Completion:
        step = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if isinstance(step, BaseException):
            raise step
        assert isinstance(step, Completion)
        return step


class InFlightTogether:
    """A `ModelBackend` whose first `n` calls are all in flight at once (each waits for
    the others), then answer GOOD: `n` workers calling concurrently, for real."""

    def __init__(self, rt: Runtime, tier: str, n: int) -> None:
        self.tier, self.model, self.provider = tier, rt.settings.model_for(tier), "scripted"
        self.calls = 0
        self._lock = threading.Lock()
        self._together = threading.Barrier(n)

    def complete(self, job: JobSpec, *, timeout_s: float) -> Completion:
        with self._lock:
            self.calls += 1
            first_round = self.calls <= self._together.parties
        if first_round:
            self._together.wait(timeout=30)
        return GOOD


def attempt_concurrently(
    rt: Runtime, job_ids: list[str], tier: str, workers: int
) -> dict[str, Next | None]:
    """Run each job's attempt on `tier`, `workers` threads taking jobs in turn, as that
    many worker threads would; each job's returned step."""
    todo = list(job_ids)
    lock = threading.Lock()
    out: dict[str, Next | None] = {}

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                job_id = todo.pop(0)
            out[job_id] = attempt_job(rt, job_id, tier)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return out


def script(rt: Runtime, tier: str, *steps: Any) -> ScriptedBackend:
    backend = ScriptedBackend(tier, rt.settings.model_for(tier), list(steps))
    rt.backends[tier] = backend
    return backend


def new_job(rt: Runtime, **fields: Any) -> str:
    spec = parse_envelope(
        {
            "feature": "reviews",
            "prompt": "Sentiment: 'love it'",
            "output_schema": "sentiment",
            **fields,
        }
    )
    with rt.ledger.session() as s:
        job_id, _ = insert_job(s, spec)
    return job_id


def outcomes(rt: Runtime, job_id: str) -> list[tuple[str, str]]:
    with rt.ledger.session() as s:
        return [(a.tier, a.outcome) for a in get_job(s, job_id).attempts]


def status(rt: Runtime, job_id: str) -> tuple[JobStatus, str | None]:
    with rt.ledger.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job.status, job.tier


def test_triage_records_its_decision_once(rt: Runtime) -> None:
    job_id = new_job(rt)
    assert triage_job(rt, job_id) == Next("slm")
    with rt.ledger.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert (job.status, job.tier) == (JobStatus.TRIAGED, "slm")
        assert job.triage_version == rt.triage.scorer.version
        assert job.triage_version.startswith("prior-") and job.triage_version.endswith("+online")
        assert job.triage_reason and job.triage_reason.startswith("score ")
        assert "new feature" in job.triage_reason and job.triage_score is not None
    assert triage_job(rt, job_id) is None  # a duplicate triage message does nothing
    assert triage_job(rt, "no-such-job") is None


def test_a_valid_answer_succeeds_and_stores_the_result(rt: Runtime) -> None:
    script(rt, "slm", GOOD)
    job_id = new_job(rt)
    triage_job(rt, job_id)
    assert attempt_job(rt, job_id, "slm") is None
    with rt.ledger.session() as s:
        view = get_job(s, job_id)
    assert (view.status, view.result) == (JobStatus.SUCCEEDED, {"label": "positive"})
    assert view.cost_usd == view.attempts[0].cost_usd > 0


def test_stale_messages_do_nothing(rt: Runtime) -> None:
    backend = script(rt, "frontier", GOOD)
    job_id = new_job(rt)
    triage_job(rt, job_id)  # -> slm
    assert attempt_job(rt, job_id, "frontier") is None  # not this job's tier
    with rt.ledger.session() as s:
        s.get(Job, job_id).status = JobStatus.CANCELLED  # type: ignore[union-attr]
    assert attempt_job(rt, job_id, "slm") is None  # terminal
    assert backend.calls == 0 and outcomes(rt, job_id) == []


def test_an_invalid_small_answer_escalates(rt: Runtime) -> None:
    script(rt, "slm", BAD)
    job_id = new_job(rt)
    triage_job(rt, job_id)
    assert attempt_job(rt, job_id, "slm") == Next("frontier")
    assert status(rt, job_id) == (JobStatus.TRIAGED, "frontier")
    with rt.ledger.session() as s:
        attempt = s.execute(select(Attempt)).scalar_one()
    assert attempt.outcome is Outcome.INVALID and "thrilled" in (attempt.error or "")


def test_a_backend_bug_is_recorded_and_escalates_instead_of_stranding_the_job(
    rt: Runtime,
) -> None:
    script(rt, "slm", ZeroDivisionError("division by zero"))
    script(rt, "frontier", GOOD)
    job_id = new_job(rt)
    triage_job(rt, job_id)
    assert attempt_job(rt, job_id, "slm") == Next("frontier")
    assert attempt_job(rt, job_id, "frontier") is None
    assert outcomes(rt, job_id) == [("slm", "failed"), ("frontier", "succeeded")]


def test_rate_limits_retry_on_the_same_tier_honouring_retry_after_then_give_up(
    rt: Runtime,
) -> None:
    rt.policy = dataclasses.replace(rt.policy, max_transient_retries=2, base_delay_s=0.5)
    script(rt, "frontier", RateLimited("429", retry_after_s=3.0), ProviderOverloaded("529"))
    job_id = new_job(rt, route="frontier")
    triage_job(rt, job_id)
    assert attempt_job(rt, job_id, "frontier") == Next("frontier", 3.0)
    assert status(rt, job_id) == (JobStatus.TRIAGED, "frontier")
    assert attempt_job(rt, job_id, "frontier") == Next("frontier", 1.0)  # 0.5 * 2**1
    assert attempt_job(rt, job_id, "frontier") is None  # third fault: retries spent
    with rt.ledger.session() as s:
        view = get_job(s, job_id)
    assert view.status is JobStatus.FAILED
    assert view.error and "still failing after 2 retries" in view.error
    assert [a.outcome for a in view.attempts] == ["error"] * 3
    assert view.cost_usd == 0  # faults used no tokens


def test_a_small_model_timeout_escalates(rt: Runtime) -> None:
    script(rt, "slm", ProviderTimeout("took 9s"))
    job_id = new_job(rt)
    triage_job(rt, job_id)
    assert attempt_job(rt, job_id, "slm") == Next("frontier")
    assert outcomes(rt, job_id) == [("slm", "timeout")]
