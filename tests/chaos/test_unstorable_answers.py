"""Answers the ledger cannot store as they came, through real worker processes: the real
`openai` and `anthropic` clients talk to the fake vLLM and Anthropic servers, which answer
with a NUL character (Postgres text and jsonb refuse it), with NaN or Infinity (Python's
JSON reader takes them, the ledger's JSON cannot hold them), or with an answer too deep
for its recursive schema to be checked (which once made the validator raise).

Each such answer was paid for. It must be booked once, with its real usage and cost, as
an invalid answer (escalated, or failed on the top rung), never left to a lapsed lease:
no `abandoned` attempt, no call made again unbilled, no dead letter."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, select

from producers import Client
from tests.chaos.test_provider_faults import requests_for
from tests.conftest import Workers, wait_until
from tests.e2e.test_fleet import hand_priced
from tests.fakes import Answer, FakeAnthropic, FakeServer, FakeVLLM
from tierfleet import constants as C
from tierfleet.constants import TERMINAL_STATUSES, JobStatus, Outcome
from tierfleet.db import Ledger
from tierfleet.models import Attempt, DeadLetter, Job

pytestmark = pytest.mark.chaos

SLM, FRONTIER = C.TIER_SLM, C.TIER_FRONTIER
TIMEOUT_S = 5.0
# Short clocks: a stranded job would be taken over (and called again) within seconds.
ENV = {
    "TIERFLEET_LEASE_GRACE_S": "1",
    "TIERFLEET_RECONCILE_INTERVAL_S": "0.5",
    "TIERFLEET_STALE_AFTER_S": "2",
    "TIERFLEET_SLM_TIMEOUT_BASE_S": str(TIMEOUT_S),
    "TIERFLEET_SLM_TIMEOUT_PER_TOKEN_S": "0",
    "TIERFLEET_FRONTIER_TIMEOUT_S": str(TIMEOUT_S),
    "TIERFLEET_FRONTIER_MAX_ATTEMPTS": "2",
}
# Well inside one lease (timeout + grace): a job that waited for its lease to lapse is late.
QUICK_S = TIMEOUT_S
WAIT_S = 60.0  # only reached when something is wrong
NEVER = 6  # more bad answers scripted than the policy asks for

RECURSIVE = {"type": "array", "items": {"$ref": "#"}}  # every level checked again
DEEP = "[" * 400 + "]" * 400  # parses; too deep for the validator's recursion
ANY_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class Case:
    """One job whose model answers `text` on `bad_tier` every time (the frontier, if it
    comes to it, answers well: `good`, or an answer the fake makes from the schema); its
    attempts as (tier, outcome), its end, and words each invalid attempt's error has."""

    name: str
    route: str
    schema: str | dict[str, Any] | None
    text: str
    trail: tuple[tuple[str, Outcome], ...]
    status: JobStatus
    reason: str
    good: str | None = None

    @property
    def bad_tier(self) -> str:
        return self.route


ESCALATED = ((SLM, Outcome.INVALID), (FRONTIER, Outcome.SUCCEEDED))
FAILED_ON_TOP = ((FRONTIER, Outcome.INVALID), (FRONTIER, Outcome.INVALID))
NUL = "cannot be stored: a NUL character (\\u0000)"
CASES = [
    Case("slm-nul-in-text", SLM, None, "Fine\u0000print.", ESCALATED, JobStatus.SUCCEEDED,
         f"{NUL} at (root)"),
    Case("slm-nul-in-a-key", SLM, ANY_OBJECT, '{"na\\u0000me": 1}', ESCALATED,
         JobStatus.SUCCEEDED, f"{NUL} in a key at (root)"),
    Case("slm-nan", SLM, "sentiment", '{"label": "positive", "confidence": NaN}', ESCALATED,
         JobStatus.SUCCEEDED, "cannot be stored: the number nan at /confidence"),
    Case("slm-infinity", SLM, ANY_OBJECT, '{"score": Infinity}', ESCALATED, JobStatus.SUCCEEDED,
         "cannot be stored: the number inf at /score"),
    Case(  # the frontier's answer comes wrapped in an object (a tool's input is one)
        "slm-validation-too-deep", SLM, RECURSIVE, DEEP, ESCALATED, JobStatus.SUCCEEDED,
        "nest too deeply to be checked", good='{"value": [[], [[]]]}',
    ),
    Case("frontier-nul-in-text", FRONTIER, None, "Fine\u0000print.", FAILED_ON_TOP,
         JobStatus.FAILED, f"{NUL} at (root)"),
    Case("frontier-validation-too-deep", FRONTIER, RECURSIVE, DEEP, FAILED_ON_TOP,
         JobStatus.FAILED, "nest too deeply to be checked"),
]  # fmt: skip


@dataclass(frozen=True)
class Seen:
    case: Case
    job: Job
    attempts: list[Attempt]
    calls: dict[str, int]  # tier -> requests its fake received for this job
    dead_letters: int

    def figure(self) -> str:
        booked = sum((a.cost_usd for a in self.attempts if a.outcome != Outcome.ABANDONED),
                     Decimal(0))  # fmt: skip
        return (
            f"{self.case.name}: {self.job.status} after {sum(self.calls.values())} calls; "
            f"{sum(1 for a in self.attempts if a.cost_usd > 0)} booked, ${booked}; "
            f"attempts {[(a.tier, str(a.outcome)) for a in self.attempts]}; "
            f"dead letters {self.dead_letters}"
        )


def submit(client: Client, fakes: dict[str, FakeServer], case: Case) -> str:
    marker = f"[case {case.name}]"
    fakes[case.bad_tier].when(marker, *(Answer(text=case.text),) * NEVER)
    if case.good is not None:
        fakes[FRONTIER].when(marker, Answer(text=case.good))
    envelope: dict[str, Any] = {
        "feature": "unstorable",
        "prompt": f"{marker} Label the review 'fine'",
        "route": case.route,
        "max_tokens": 64,
    }
    if case.schema is not None:
        envelope["output_schema"] = case.schema
    return client.submit(envelope)


def observe(ledger: Ledger, fakes: dict[str, FakeServer], submitted: dict[str, Case]) -> list[Seen]:
    with ledger.session() as s:
        jobs = {j.id: j for j in s.execute(select(Job).where(Job.id.in_(submitted))).scalars()}
        rows = s.execute(
            select(Attempt).where(Attempt.job_id.in_(submitted)).order_by(Attempt.seq)
        ).scalars()
        attempts: dict[str, list[Attempt]] = {job_id: [] for job_id in submitted}
        for a in rows:
            attempts[a.job_id].append(a)
        dead = dict(
            s.execute(
                select(DeadLetter.job_id, func.count())
                .where(DeadLetter.job_id.in_(submitted))
                .group_by(DeadLetter.job_id)
            ).all()
        )
    seen = []
    for job_id, case in submitted.items():
        marker = f"[case {case.name}]"
        calls = {tier: len(requests_for(fake, marker)) for tier, fake in fakes.items()}
        seen.append(Seen(case, jobs[job_id], attempts[job_id], calls, dead.get(job_id, 0)))
    return seen


def terminal_at(ledger: Ledger, ids: list[str], since: float, done: dict[str, float]) -> bool:
    with ledger.session() as s:
        finished = s.execute(
            select(Job.id).where(Job.id.in_(ids), Job.status.in_(list(TERMINAL_STATUSES)))
        ).scalars()
        for job_id in finished:
            done.setdefault(job_id, time.monotonic() - since)
    return len(done) == len(ids)


def check(seen: Seen, took_s: float) -> None:
    job, attempts, where = seen.job, seen.attempts, seen.figure()
    assert job.status == seen.case.status, where
    assert [(a.tier, Outcome(a.outcome)) for a in attempts] == list(seen.case.trail), where
    # every call the fakes answered has its attempt row, billed its real usage
    for tier in (SLM, FRONTIER):
        assert seen.calls[tier] == sum(1 for a in attempts if a.tier == tier), where
    for a in attempts:
        assert a.cost_usd > 0, where
        assert a.cost_usd == hand_priced(
            a.model, a.input_tokens, a.output_tokens, a.cache_write_tokens, a.cache_read_tokens
        ), where
    assert job.cost_usd == sum((a.cost_usd for a in attempts), Decimal(0)), where
    assert seen.dead_letters == 0, where
    # the reason is on the invalid attempts, and on the job when it failed
    for a in attempts:
        if a.outcome == Outcome.INVALID:
            assert a.error and seen.case.reason in a.error and "\x00" not in a.error, where
    if job.status is JobStatus.FAILED:
        assert job.error and "still invalid" in job.error and seen.case.reason in job.error, where
        assert job.result is None, where
    assert took_s < QUICK_S, f"{where}: terminal after {took_s:.1f}s"


def test_answers_the_ledger_cannot_store_are_booked_as_invalid_with_their_cost(
    client: Client,
    ledger: Ledger,
    fake_vllm: FakeVLLM,
    fake_anthropic: FakeAnthropic,
    real_env: dict[str, str],
    start_workers: Callable[..., Workers],
) -> None:
    fakes: dict[str, FakeServer] = {SLM: fake_vllm, FRONTIER: fake_anthropic}
    workers = start_workers("triage", "slm", "frontier", TIERFLEET_BEAT="1", **{**real_env, **ENV})
    probe = client.submit({"feature": "probe", "prompt": "Say hello", "route": SLM})
    wait_until(
        lambda: terminal_at(ledger, [probe], time.monotonic(), {}),
        timeout_s=WAIT_S,
        what=f"the fleet to answer a probe\n{workers.output()[-3000:]}",
    )
    start = time.monotonic()
    submitted = {submit(client, fakes, case): case for case in CASES}
    took: dict[str, float] = {}
    wait_until(
        lambda: terminal_at(ledger, list(submitted), start, took),
        timeout_s=WAIT_S,
        what=f"terminal jobs\n{workers.output()[-4000:]}",
    )
    seen = observe(ledger, fakes, submitted)
    print("\n" + "\n".join(f"{s.figure()}; {took[s.job.id]:.1f}s" for s in seen))
    for one in seen:
        check(one, took[one.job.id])
    # nothing the answers said reached the logs
    output = workers.output()
    assert "print." not in output and "na\\u0000me" not in output and "Infinity" not in output
