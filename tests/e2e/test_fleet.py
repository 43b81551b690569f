"""The whole fleet: real `tierfleet worker` processes (one per pool), real Redis and
Postgres, simulated models, DogStatsD caught on a loopback socket."""

from __future__ import annotations

import tomllib
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from itertools import islice

import pytest
from sqlalchemy import func, select

from producers import Client
from tests.conftest import StatsdListener, Workers, wait_until
from tierfleet.constants import TERMINAL_STATUSES, JobStatus
from tierfleet.db import Ledger
from tierfleet.demo import example_jobs
from tierfleet.models import Attempt, Job
from tierfleet.resources import default_prices_file

pytestmark = pytest.mark.e2e

N_JOBS = 120


def all_terminal(ledger: Ledger, expected: int) -> bool:
    with ledger.session() as s:
        done = s.execute(
            select(func.count()).select_from(Job).where(Job.status.in_(list(TERMINAL_STATUSES)))
        ).scalar_one()
    return done == expected


def hand_priced(
    model: str, input_tokens: int, output_tokens: int, cache_write: int = 0, cache_read: int = 0
) -> Decimal:
    """The price file's arithmetic, done here independently of tierfleet.prices."""
    data = tomllib.loads(default_prices_file().read_text())
    entry = {**data["defaults"], **data["models"][model]}
    if "gpu_usd_per_hour" in entry:
        hour = Decimal(str(entry["gpu_usd_per_hour"]))
        util = Decimal(str(entry["utilization"]))
        per_in = hour / (Decimal(entry["input_tokens_per_s"]) * 3600 * util)
        per_out = hour / (Decimal(entry["output_tokens_per_s"]) * 3600 * util)
    else:
        per_in = Decimal(str(entry["input_usd_per_mtok"])) / 1_000_000
        per_out = Decimal(str(entry["output_usd_per_mtok"])) / 1_000_000
    write = per_in * Decimal(str(entry["cache_write_multiplier"]))
    read = per_in * Decimal(str(entry["cache_read_multiplier"]))
    total = input_tokens * per_in + output_tokens * per_out + cache_write * write
    return (total + cache_read * read).quantize(Decimal("1e-8"))


def test_a_batch_runs_end_to_end_with_escalations_costs_and_metrics(
    client: Client,
    ledger: Ledger,
    statsd: StatsdListener,
    start_workers: Callable[..., Workers],
    fleet_env: dict[str, str],
) -> None:
    secret_db_url = fleet_env["DATABASE_URL"].replace("//postgres@", "//postgres:pg-Pa55word@")
    assert "pg-Pa55word" in secret_db_url  # trust auth: the password is accepted, unused
    workers = start_workers(
        "triage",
        "slm",
        "frontier",
        concurrency=2,
        DATABASE_URL=secret_db_url,
        ANTHROPIC_API_KEY="sk-ant-api03-SECRET-KEY",
        TIERFLEET_LOG_LEVEL="DEBUG",
    )
    ids = [client.submit(e) for e in islice(example_jobs(N_JOBS, "e2e"), N_JOBS)]
    assert len(set(ids)) == N_JOBS

    wait_until(
        lambda: all_terminal(ledger, N_JOBS),
        timeout_s=90,
        what=f"{N_JOBS} terminal jobs\n{workers.output()[-3000:]}",
    )

    with ledger.session() as s:
        jobs = {j.id: j for j in s.execute(select(Job)).scalars()}
        attempts: dict[str, list[Attempt]] = {}
        for a in s.execute(select(Attempt).order_by(Attempt.job_id, Attempt.seq)).scalars():
            attempts.setdefault(a.job_id, []).append(a)

    escalated = [i for i in ids if len({a.tier for a in attempts[i]}) > 1]
    assert escalated, "the simulated small model is invalid 25% of the time"
    for job_id in ids:
        job, tried = jobs[job_id], attempts[job_id]
        assert job.status is JobStatus.SUCCEEDED, (job.error, [a.outcome for a in tried])
        assert job.result is not None
        assert job.triage_reason and job.triage_version
        if job_id in escalated:
            assert [(a.tier, a.outcome.value) for a in tried] == [
                ("slm", "invalid"),
                ("frontier", "succeeded"),
            ]
            assert tried[0].error and job.tier == "frontier"
        else:
            assert len(tried) == 1 and tried[0].tier == job.tier
        # every attempt priced from its usage, and the job's cost is their sum
        for a in tried:
            assert a.cost_usd == hand_priced(a.model, a.input_tokens, a.output_tokens) > 0
            assert a.latency_ms >= 0 and a.input_tokens > 0 and a.output_tokens > 0
        assert job.cost_usd == sum(a.cost_usd for a in tried)

    expected_total = sum(
        hand_priced(a.model, a.input_tokens, a.output_tokens)
        for tried in attempts.values()
        for a in tried
    )
    with ledger.session() as s:
        assert s.execute(select(func.sum(Job.cost_usd))).scalar_one() == expected_total

    n_attempts = sum(len(t) for t in attempts.values())

    def counts() -> Counter[str]:
        c: Counter[str] = Counter()
        for name, value, kind, _ in statsd.metrics():
            if kind == "c":
                c[name] += int(value) if name != "tierfleet.cost_usd" else 0
        return c

    wait_until(
        lambda: (
            counts()["tierfleet.jobs.finished"] == N_JOBS
            and counts()["tierfleet.attempts"] == n_attempts
        ),
        timeout_s=10,
        what="DogStatsD packets",
    )
    c = counts()
    assert c["tierfleet.jobs.submitted"] == N_JOBS
    assert c["tierfleet.escalations"] == len(escalated)
    metrics = statsd.metrics()
    attempt_tags = [tags for name, _, _, tags in metrics if name == "tierfleet.attempts"]
    assert all(
        {"tier", "model_name", "model_provider", "feature", "outcome"} <= set(t)
        for t in attempt_tags
    )
    assert Counter((t["tier"], t["outcome"]) for t in attempt_tags)[("slm", "invalid")] == len(
        escalated
    )
    assert {t["model_provider"] for t in attempt_tags} == {"sim-vllm", "sim-anthropic"}
    latency = [m for m in metrics if m[0] == "tierfleet.attempt.latency_ms"]
    assert len(latency) == n_attempts and all(kind == "d" for _, _, kind, _ in latency)
    output = workers.output()
    assert "action=attempt.done" in output
    assert "pg-Pa55word" not in output and "SECRET-KEY" not in output
    booked = sum(Decimal(str(v)) for name, v, _, _ in metrics if name == "tierfleet.cost_usd")
    assert abs(booked - expected_total) < Decimal("1e-6")


def test_a_top_tier_answer_that_stays_invalid_fails_the_job_with_its_reason(
    client: Client, ledger: Ledger, start_workers: Callable[..., Workers]
) -> None:
    start_workers(
        "all", TIERFLEET_SIM_FRONTIER_INVALID_RATE="1.0", TIERFLEET_SIM_INVALID_RATE="1.0"
    )
    job_id = client.submit(
        {"feature": "f", "prompt": "Sentiment of: 'meh'", "output_schema": "sentiment"}
    )
    view = client.wait(job_id, timeout_s=60)
    assert view.status is JobStatus.FAILED
    assert [(a.tier, a.outcome) for a in view.attempts] == [
        ("slm", "invalid"),
        ("frontier", "invalid"),
        ("frontier", "invalid"),
    ]
    assert view.error and "frontier answer still invalid after 2 attempts" in view.error
    assert view.cost_usd == sum(a.cost_usd for a in view.attempts) > 0


def test_an_explicit_route_skips_the_small_tier(
    client: Client, start_workers: Callable[..., Workers]
) -> None:
    start_workers("all")
    job_id = client.submit({"feature": "f", "prompt": "Summarise: ...", "route": "frontier"})
    view = client.wait(job_id, timeout_s=60)
    assert view.status is JobStatus.SUCCEEDED
    assert [(a.tier, a.outcome) for a in view.attempts] == [("frontier", "succeeded")]
    assert view.triage_reason == "route"
