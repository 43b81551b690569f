"""The learned router in the pipeline, on the real Redis and Postgres: worker steps teach
it every small-tier outcome, triage reads what all workers taught it, each decision is
recorded with the scorer's version, score and reason, and `tierfleet triage retrain`
rebuilds the same memory from the ledger."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from tests.integration.test_steps import BAD, GOOD, new_job, script
from tierfleet.cli import app
from tierfleet.models import Job
from tierfleet.settings import Settings
from workers.execute import Next, attempt_job, triage_job
from workers.router.memory import RedisMemory
from workers.router.router import LearnedRouter
from workers.runtime import Runtime

pytestmark = pytest.mark.integration


@pytest.fixture
def rt(rt: Runtime) -> Runtime:
    assert isinstance(rt.triage.scorer, LearnedRouter)
    assert isinstance(rt.triage.scorer.memory, RedisMemory)
    rt.triage.scorer.memory.refresh_s = 0.0  # read what was just learnt
    return rt


def run(rt: Runtime, job_id: str) -> str:
    """Triage the job and run its attempts to the end; the tier it was triaged to."""
    first = triage_job(rt, job_id)
    assert first is not None
    step: Next | None = first
    while step is not None:
        step = attempt_job(rt, job_id, step.tier)
    return first.tier


PROMPT = "Extract the invoice number and the total from: 'INV-{i}, total 41.50 EUR'"


def test_a_feature_that_keeps_failing_on_the_small_tier_goes_straight_to_the_frontier(
    rt: Runtime,
) -> None:
    script(rt, "slm", BAD)  # the small model's answers never pass
    script(rt, "frontier", GOOD)
    router = rt.triage.scorer
    assert isinstance(router, LearnedRouter)
    router.explore = 0.0  # exploration has its own test; here every decision is the score's
    first = [run(rt, new_job(rt, feature="invoices", prompt=PROMPT.format(i=i))) for i in range(30)]
    assert first[0] == "slm"  # a new feature starts at the prior: small first
    later = [
        run(rt, new_job(rt, feature="invoices", prompt=PROMPT.format(i=i))) for i in range(30, 40)
    ]
    assert later == ["frontier"] * 10
    with rt.ledger.session() as s:
        job = (
            s.execute(select(Job).where(Job.feature == "invoices").order_by(Job.created_at.desc()))
            .scalars()
            .first()
        )
    assert job is not None and job.triage_version == rt.triage.scorer.version
    assert job.triage_score is not None and job.triage_score > 0.5
    assert job.triage_reason and "offset +" in job.triage_reason


def test_a_feature_that_keeps_passing_stays_small_and_another_feature_is_not_moved(
    rt: Runtime,
) -> None:
    script(rt, "slm", GOOD)
    script(rt, "frontier", GOOD)
    tiers = [
        run(rt, new_job(rt, feature="reviews", prompt=f"Sentiment of review {i}: 'fine'"))
        for i in range(40)
    ]
    assert tiers.count("slm") == 40
    router = rt.triage.scorer
    assert isinstance(router, LearnedRouter)
    stats = router.memory.stats("reviews")
    assert stats.n == 40 and stats.positives == 0 and sum(stats.triaged) == 40
    assert router.offset(stats) < 0  # it learnt that the small tier suffices here
    assert router.memory.stats("invoices").n == 0


def test_retrain_rebuilds_the_memory_the_workers_built(
    rt: Runtime, settings: Settings, redis_url: str
) -> None:
    script(rt, "slm", GOOD, BAD, BAD)  # a mix of small-tier outcomes
    script(rt, "frontier", GOOD)
    for i in range(24):
        run(rt, new_job(rt, feature=f"f{i % 3}", prompt=PROMPT.format(i=i)))
    router = rt.triage.scorer
    assert isinstance(router, LearnedRouter)
    assert isinstance(router.memory, RedisMemory)
    router.memory.flush()
    before = {f: router.memory.stats(f) for f in ("f0", "f1", "f2")}
    router.memory.reset({})  # Redis lost it
    assert router.memory.stats("f0").n == 0

    result = CliRunner().invoke(app, ["triage", "retrain", "--json"])
    assert result.exit_code == 0, result.output
    after = {f: router.memory.stats(f) for f in ("f0", "f1", "f2")}
    for f in before:
        assert (after[f].n, after[f].positives) == (before[f].n, before[f].positives)
        assert after[f].prior_sum == pytest.approx(before[f].prior_sum)
        assert after[f].triaged == before[f].triaged
        assert after[f].observed == before[f].observed
        assert after[f].escalated == before[f].escalated


@pytest.mark.chaos
def test_an_explicit_route_names_the_starting_tier_and_an_invalid_answer_still_escalates(
    rt: Runtime,
) -> None:
    """`route: slm` skips triage's rules and router, but not validation: a bad small
    answer climbs to the frontier, as the schema's description of `route` says."""
    small = script(rt, "slm", BAD)
    big = script(rt, "frontier", GOOD)
    job_id = new_job(rt, route="slm", feature="pinned-probe")
    assert run(rt, job_id) == "slm"
    with rt.ledger.session() as s:
        job = s.get_one(Job, job_id)
        assert (job.status, job.tier, job.triage_reason) == ("succeeded", "frontier", "route")
    assert (small.calls, big.calls) == (1, 1)
