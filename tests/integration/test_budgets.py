"""Daily budgets on the real Postgres: once a cap is reached, new frontier attempts in its
scope wait (triaged, the reason on the job) instead of spending; eight workers calling at
once overshoot by at most their calls in flight; a raised cap lets the waiting jobs go on;
a feature's cap counts its small-tier spend too but holds only frontier calls."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from tests.integration.test_steps import (
    GOOD,
    InFlightTogether,
    attempt_concurrently,
    new_job,
    script,
)
from tierfleet.cli import app
from tierfleet.constants import JobStatus
from tierfleet.models import Attempt, BudgetSpend, Job
from tierfleet.settings import Settings
from workers.execute import Next, attempt_job, triage_job
from workers.runtime import Runtime

pytestmark = pytest.mark.integration
runner = CliRunner()
WORKERS = 8


@pytest.fixture
def rt(rt: Runtime) -> Runtime:
    rt.budgets.refresh_s = 0.0  # a cap set by the CLI is seen at once
    return rt


def per_call(rt: Runtime, tier: str) -> Decimal:
    return rt.prices[rt.settings.model_for(tier)].cost_usd(GOOD.usage)


def set_cap(scope: str, usd: Decimal | str) -> None:
    result = runner.invoke(app, ["budgets", "set", scope, str(usd)])
    assert result.exit_code == 0, result.output


def frontier_jobs(rt: Runtime, n: int, feature: str = "reports") -> list[str]:
    ids = [
        new_job(rt, route="frontier", feature=feature, prompt=f"Summarise {i}") for i in range(n)
    ]
    for job_id in ids:
        assert triage_job(rt, job_id) == Next("frontier")
    return ids


def test_eight_workers_overshoot_a_frontier_cap_by_their_calls_in_flight_at_most(
    rt: Runtime,
) -> None:
    one = per_call(rt, "frontier")
    cap = one * 3
    set_cap("frontier", cap)
    backend = InFlightTogether(rt, "frontier", WORKERS)
    rt.backends["frontier"] = backend
    ids = frontier_jobs(rt, 40)
    steps = attempt_concurrently(rt, ids, "frontier", WORKERS)

    with rt.ledger.session() as s:
        spent = s.execute(
            select(BudgetSpend.spent_usd).where(BudgetSpend.scope == "frontier")
        ).scalar_one()
        billed = s.execute(select(func.sum(Attempt.cost_usd))).scalar_one()
        jobs = {j.id: j for j in s.execute(select(Job)).scalars()}
    done = [i for i in ids if jobs[i].status == JobStatus.SUCCEEDED]
    waiting = [i for i in ids if jobs[i].status == JobStatus.TRIAGED]
    assert len(done) + len(waiting) == len(ids)
    assert spent == billed == len(done) * one == backend.calls * one
    assert cap <= spent <= cap + WORKERS * one  # the in-flight bound
    assert len(waiting) >= len(ids) - 2 * WORKERS
    for job_id in waiting:
        reason = jobs[job_id].hold_reason or ""
        assert (
            "daily budget of the frontier is spent" in reason and "budgets set frontier" in reason
        )
        step = steps[job_id]
        assert step is not None and step.tier == "frontier" and 0 < step.delay_s <= 60
        assert jobs[job_id].attempt_count == 0  # the claim was rolled back: nothing ran

    shown = runner.invoke(app, ["budgets", "--json"])
    assert shown.exit_code == 0, shown.output
    listed = shown.stdout
    assert '"reached": true' in listed and f'"jobs_waiting": {len(waiting)}' in listed

    set_cap("frontier", "1000")  # raised: the waiting jobs go on at their next look
    script(rt, "frontier", GOOD)
    for job_id in waiting:
        assert attempt_job(rt, job_id, "frontier") is None
    with rt.ledger.session() as s:
        statuses = set(s.execute(select(Job.status).where(Job.id.in_(ids))).scalars())
        holds = s.execute(select(func.count()).where(Job.hold_reason.is_not(None))).scalar_one()
    assert statuses == {JobStatus.SUCCEEDED} and holds == 0


def test_a_feature_cap_counts_small_tier_spend_and_holds_only_frontier_calls(rt: Runtime) -> None:
    small = per_call(rt, "slm")
    set_cap("feature:tags", small * 2)
    script(rt, "slm", GOOD)
    script(rt, "frontier", GOOD)
    for i in range(3):  # small-tier calls are never held: self-hosted and cheap
        job_id = new_job(rt, route="slm", feature="tags", prompt=f"Tag {i}")
        triage_job(rt, job_id)
        assert attempt_job(rt, job_id, "slm") is None
    (job_id,) = frontier_jobs(rt, 1, feature="tags")
    step = attempt_job(rt, job_id, "frontier")
    assert step is not None and step.delay_s > 0
    other = frontier_jobs(rt, 1, feature="reports")[0]  # another feature spends on
    assert attempt_job(rt, other, "frontier") is None
    with rt.ledger.session() as s:
        assert s.get_one(Job, job_id).hold_reason and "feature 'tags'" in (
            s.get_one(Job, job_id).hold_reason or ""
        )
        spent = s.execute(
            select(BudgetSpend.spent_usd).where(BudgetSpend.scope == "feature:tags")
        ).scalar_one()
    assert spent == 3 * small


def test_budget_commands_refuse_bad_input(settings: Settings) -> None:
    assert runner.invoke(app, ["budgets", "set", "tier", "5"]).exit_code == 2
    assert runner.invoke(app, ["budgets", "set", "frontier", "-1"]).exit_code == 2
    assert runner.invoke(app, ["budgets", "set", "frontier", "nan"]).exit_code == 2
    assert runner.invoke(app, ["budgets", "unset", "feature:none"]).exit_code == 4
