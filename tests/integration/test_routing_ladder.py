"""The learned router on a three-rung ladder (slm -> haiku -> sonnet), on the real Redis
and Postgres: worker steps teach every rung below the top, triage starts a job on the
lowest rung whose score is below its threshold, a failure on the top takes back the
escalations below it, and `tierfleet triage retrain` rebuilds the same per-(feature, tier)
memory from the ledger, in the Redis keys the memory reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from sqlalchemy import select
from typer.testing import CliRunner

from tests.integration.test_routing import run
from tests.integration.test_steps import BAD, GOOD, new_job, script
from tierfleet.cli import app
from tierfleet.models import Job
from tierfleet.settings import Settings
from workers.router.memory import RedisMemory
from workers.router.router import LearnedRouter
from workers.runtime import Runtime

pytestmark = pytest.mark.integration

FLEET = """
[[tier]]
name = "slm"
backend = "sim"
model = "meta-llama/Meta-Llama-3-8B-Instruct"

[[tier]]
name = "haiku"
backend = "sim"
model = "claude-haiku-4-5"

[[tier]]
name = "sonnet"
backend = "sim"
model = "claude-sonnet-4-6"
max_attempts = 1
"""
PROMPT = "Extract the invoice number and the total from: 'INV-{i}, total 41.50 EUR'"


@pytest.fixture
def settings(
    fleet_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Settings:
    for key, value in fleet_env.items():
        if key.startswith(("TIERFLEET_", "DD_")) or key in ("REDIS_URL", "DATABASE_URL"):
            monkeypatch.setenv(key, value)
    path = tmp_path / "fleet.toml"
    path.write_text(FLEET)
    monkeypatch.setenv("TIERFLEET_FLEET_FILE", str(path))
    return Settings.from_env()


@pytest.fixture
def router(rt: Runtime) -> LearnedRouter:
    assert rt.triage.ladder == ("slm", "haiku", "sonnet")
    scorer = rt.triage.scorer
    assert isinstance(scorer, LearnedRouter) and isinstance(scorer.memory, RedisMemory)
    scorer.memory.refresh_s = 0.0  # read what was just learnt
    scorer.explore = 0.0  # every decision is the scores'
    return scorer


def jobs(rt: Runtime, feature: str, first: int, last: int) -> list[str]:
    return [
        run(rt, new_job(rt, feature=feature, prompt=PROMPT.format(i=i))) for i in range(first, last)
    ]


def test_a_feature_the_bottom_keeps_failing_starts_on_the_middle_rung(
    rt: Runtime, router: LearnedRouter
) -> None:
    script(rt, "slm", BAD)
    script(rt, "haiku", GOOD)
    big = script(rt, "sonnet", GOOD)
    first = jobs(rt, "invoices", 0, 30)
    assert first[0] == "slm"  # a new feature: the prior, below the bottom's cold 0.5
    assert jobs(rt, "invoices", 30, 40) == ["haiku"] * 10
    assert big.calls == 0  # nothing needed the top
    slm, haiku = router.memory.stats("invoices", "slm"), router.memory.stats("invoices", "haiku")
    assert slm.positives == slm.n == sum(slm.escalated) > 0
    assert haiku.n == 40 and haiku.positives == 0  # climbed to, then started on
    with rt.ledger.session() as s:
        job = s.execute(select(Job).order_by(Job.created_at.desc())).scalars().first()
    assert job is not None and job.triage_reason is not None
    assert job.triage_reason.startswith("slm: score ") and "; haiku: score " in job.triage_reason
    assert job.triage_score is not None and job.triage_score < 0.75  # haiku's, which decided


def test_a_feature_the_middle_rung_fails_too_starts_on_the_top(
    rt: Runtime, router: LearnedRouter
) -> None:
    script(rt, "slm", BAD)
    script(rt, "haiku", BAD)
    script(rt, "sonnet", GOOD)
    jobs(rt, "proofs", 0, 45)
    assert jobs(rt, "proofs", 45, 55) == ["sonnet"] * 10
    haiku = router.memory.stats("proofs", "haiku")
    assert haiku.n > 0 and haiku.positives == haiku.n  # every haiku answer needed the top


def test_a_failure_on_the_top_takes_back_the_escalations_of_every_rung_below(
    rt: Runtime, router: LearnedRouter
) -> None:
    script(rt, "slm", BAD)
    script(rt, "haiku", BAD)
    script(rt, "sonnet", BAD)
    job_id = new_job(rt, feature="hopeless", prompt=PROMPT.format(i=1))
    run(rt, job_id)
    with rt.ledger.session() as s:
        assert s.get_one(Job, job_id).status == "failed"
    for tier in ("slm", "haiku"):
        stats = router.memory.stats("hopeless", tier)
        assert (stats.n, stats.positives, sum(stats.escalated)) == (1, 0, 1)


def test_retrain_rebuilds_the_per_tier_memory_the_workers_built(
    rt: Runtime, router: LearnedRouter, redis_url: str
) -> None:
    script(rt, "slm", *[GOOD, BAD, BAD] * 20)
    script(rt, "haiku", *[GOOD, BAD] * 30)
    script(rt, "sonnet", GOOD, BAD)  # one failure on the top: a take-back below it
    for i in range(36):
        run(rt, new_job(rt, feature=f"f{i % 3}", prompt=PROMPT.format(i=i)))
    router.memory.flush()
    keys = [(f, t) for f in ("f0", "f1", "f2") for t in ("slm", "haiku")]
    before = {k: router.memory.stats(*k) for k in keys}
    assert sum(before[(f, "haiku")].n for f in ("f0", "f1", "f2")) > 0
    client = redis.Redis.from_url(redis_url)
    assert client.exists("tierfleet:router:stats", "tierfleet:router:haiku:stats") == 2
    router.memory.reset({})  # Redis lost it
    assert not client.keys("tierfleet:router:*")

    result = CliRunner().invoke(app, ["triage", "retrain", "--json"])
    assert result.exit_code == 0, result.output
    for k in keys:
        after, was = router.memory.stats(*k), before[k]
        assert (after.n, after.positives) == (was.n, was.positives), k
        assert after.prior_sum == pytest.approx(was.prior_sum)
        assert (after.triaged, after.observed, after.escalated) == (
            was.triaged,
            was.observed,
            was.escalated,
        ), k
    client.close()
