"""Cancelling a batch stops every call that has not started, on every rung: a job running
on the small tier when its batch is cancelled finishes that call (billed), and is then
cancelled instead of escalated to the frontier or retried on its tier. Real worker
processes and provider clients, a fake vLLM that holds its answers until released; and
the claim's cases one step at a time."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from producers import bulk
from producers.batches import cancel
from producers.jsonl import open_input
from tests.chaos.test_provider_faults import requests_for
from tests.conftest import Workers, wait_until
from tests.fakes import Action, Error, FakeAnthropic, FakeVLLM, Invalid
from tests.integration.test_leases import DuringCall
from tests.integration.test_steps import BAD, GOOD, script
from tierfleet.constants import TERMINAL_STATUSES, JobStatus, Outcome
from tierfleet.db import Ledger
from tierfleet.errors import ProviderOverloaded
from tierfleet.models import Attempt, Batch, Job
from tierfleet.settings import Settings
from tierfleet.transport import make_celery
from workers.execute import Next, attempt_job, triage_job
from workers.runtime import Runtime

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

WAIT_S = 60.0  # only reached when something is wrong
# what the small model answers each job, once released: invalid (the job would escalate)
# or a transient fault (it would be retried on the small tier)
SMALL_ANSWERS: list[Action] = [Invalid(), Invalid(), Invalid(), Error(503)]


class HeldVLLM(FakeVLLM):
    """A fake vLLM that holds every request until `release()`, then plays its script."""

    name = "held-vllm"

    def __init__(self) -> None:
        super().__init__()
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    async def _play(self, request: Any, body: Any, action: Action) -> Any:
        await asyncio.to_thread(self._released.wait, WAIT_S)
        return await super()._play(request, body, action)


@pytest.fixture
def held_vllm() -> Iterator[HeldVLLM]:
    with HeldVLLM() as fake:
        yield fake
        fake.release()


def submit_batch(settings: Settings, ledger: Ledger, tmp_path: Path, prompts: list[str]) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "jobs.jsonl"
    lines = (
        {"feature": "reviews", "prompt": p, "output_schema": "sentiment", "route": "slm"}
        for p in prompts
    )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    celery = make_celery(settings)
    try:
        with open_input(str(path)) as source:
            report = bulk.submit(source, bulk.BatchOptions(), ledger, celery, settings.queue_triage)
    finally:
        celery.close()
    assert report.written == len(prompts)
    return report.batch_id


def batch_rows(ledger: Ledger, batch_id: str) -> tuple[Batch, list[Job], list[Attempt]]:
    with ledger.session() as s:
        batch = s.get_one(Batch, batch_id)
        jobs = list(s.execute(select(Job).where(Job.batch_id == batch_id)).scalars())
        attempts = list(
            s.execute(
                select(Attempt).join(Job).where(Job.batch_id == batch_id).order_by(Attempt.seq)
            ).scalars()
        )
    return batch, jobs, attempts


def test_a_batch_cancelled_mid_call_starts_no_new_call_on_any_rung(
    settings: Settings,
    ledger: Ledger,
    held_vllm: HeldVLLM,
    fake_anthropic: FakeAnthropic,
    real_env: dict[str, str],
    start_workers: Callable[..., Workers],
    tmp_path: Path,
) -> None:
    markers = [f"[cancel {i}]" for i in range(len(SMALL_ANSWERS))]
    for marker, action in zip(markers, SMALL_ANSWERS, strict=True):
        held_vllm.when(marker, action)
    env = {
        **real_env,
        "VLLM_BASE_URL": held_vllm.base_url,
        "TIERFLEET_SLM_TIMEOUT_BASE_S": str(WAIT_S),  # the held calls do not time out
        "TIERFLEET_SLM_TIMEOUT_PER_TOKEN_S": "0",
    }
    workers = start_workers("triage", "slm", "frontier", concurrency=len(markers), **env)
    batch_id = submit_batch(settings, ledger, tmp_path, [f"{m} Sentiment: 'ok'" for m in markers])
    wait_until(
        lambda: held_vllm.in_flight == len(markers),
        timeout_s=WAIT_S,
        what=f"every small call in flight\n{workers.output()[-3000:]}",
    )
    assert cancel(ledger, batch_id) == 0  # nothing unstarted: every job is mid-call
    held_vllm.release()

    def all_ended() -> bool:
        _batch, jobs, _attempts = batch_rows(ledger, batch_id)
        return all(j.status in TERMINAL_STATUSES for j in jobs)

    wait_until(all_ended, timeout_s=WAIT_S, what=f"terminal jobs\n{workers.output()[-3000:]}")
    batch, jobs, attempts = batch_rows(ledger, batch_id)
    assert batch.cancelled_at is not None
    after_cancel = [a for a in attempts if a.started_at > batch.cancelled_at]
    frontier_calls = sum(len(requests_for(fake_anthropic, m)) for m in markers)
    small_calls = sum(len(requests_for(held_vllm, m)) for m in markers)
    figure = (
        f"{frontier_calls} frontier calls, {small_calls} small calls, "
        f"{len(after_cancel)} attempts started after the cancel: "
        f"{[(a.tier, str(a.outcome)) for a in after_cancel]}; "
        f"jobs {sorted(str(j.status) for j in jobs)}"
    )
    print("\n" + figure)
    assert (frontier_calls, small_calls, after_cancel) == (0, len(markers), []), figure
    # the calls in flight were booked, and then each job was cancelled, saying why
    assert sorted((a.tier, a.outcome) for a in attempts) == sorted(
        ("slm", Outcome.ERROR if isinstance(a, Error) else Outcome.INVALID) for a in SMALL_ANSWERS
    )
    for job in jobs:
        assert job.status == JobStatus.CANCELLED, figure
        assert job.error is not None and "its batch was cancelled" in job.error, job.error
        assert job.cost_usd == sum((a.cost_usd for a in attempts if a.job_id == job.id), Decimal(0))


# --- the claim, one step at a time ------------------------------------------------------


class CancelDuringCall(DuringCall):
    """The job's batch is cancelled while its call is in flight; then it answers."""

    def __init__(self, rt: Runtime, batch_id: str, answer: Any) -> None:
        super().__init__(rt, lambda: cancel(rt.ledger, batch_id))
        self.script = [answer]


def one_job_batch(rt: Runtime, tmp_path: Path, prompt: str = "Sentiment: 'ok'") -> tuple[str, str]:
    batch_id = submit_batch(rt.settings, rt.ledger, tmp_path, [prompt])
    with rt.ledger.session() as s:
        [job_id] = s.execute(select(Job.id).where(Job.batch_id == batch_id)).scalars()
    assert triage_job(rt, job_id) == Next("slm")
    return batch_id, job_id


@pytest.mark.parametrize(
    ("answer", "then"),
    [(BAD, Next("frontier")), (ProviderOverloaded("overloaded"), Next("slm", 0.05))],
    ids=["escalated", "retried"],
)
def test_a_job_whose_batch_was_cancelled_mid_call_is_cancelled_at_its_next_claim(
    rt: Runtime, tmp_path: Path, answer: Any, then: Next
) -> None:
    batch_id, job_id = one_job_batch(rt, tmp_path)
    rt.backends["slm"] = small = CancelDuringCall(rt, batch_id, answer)
    assert attempt_job(rt, job_id, "slm") == then  # the call in flight is booked
    frontier = script(rt, "frontier", GOOD)
    assert attempt_job(rt, job_id, then.tier) is None  # claimed no more: cancelled

    _batch, [job], [attempt] = batch_rows(rt.ledger, batch_id)
    assert (small.calls, frontier.calls) == (1, 0)
    assert attempt.tier == "slm" and job.cost_usd == attempt.cost_usd
    assert (job.status, job.tier, job.attempt_count) == (JobStatus.CANCELLED, then.tier, 1)
    assert job.error is not None and job.error.startswith("cancelled: its batch was cancelled")
    assert job.finished_at is not None


def test_a_lost_worker_s_job_in_a_cancelled_batch_is_cancelled_not_taken_over(
    rt: Runtime, tmp_path: Path
) -> None:
    batch_id, job_id = one_job_batch(rt, tmp_path)

    def lost_then_cancelled() -> None:
        cancel(rt.ledger, batch_id)
        with rt.ledger.begin() as conn:  # the lease lapses: the worker is taken for lost
            past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
            conn.execute(update(Job).where(Job.id == job_id).values(lease_until=past))
        rt.backends["slm"] = successor
        assert attempt_job(rt, job_id, "slm") is None  # the re-driven message
        rt.backends["slm"] = lost

    successor = script(rt, "slm", GOOD)
    rt.backends["slm"] = lost = DuringCall(rt, lost_then_cancelled)
    assert attempt_job(rt, job_id, "slm") is None  # the lost worker's answer: fenced

    _batch, [job], attempts = batch_rows(rt.ledger, batch_id)
    assert successor.calls == 0 and lost.calls == 1
    assert [(a.seq, a.outcome) for a in attempts] == [(1, Outcome.ABANDONED)]
    assert attempts[0].cost_usd > 0 and job.cost_usd == attempts[0].cost_usd  # billed once
    assert job.status == JobStatus.CANCELLED and job.lease_until is None
    assert job.error is not None and "its batch was cancelled" in job.error


def test_a_job_of_another_batch_is_claimed_as_before(rt: Runtime, tmp_path: Path) -> None:
    cancelled, _ = one_job_batch(rt, tmp_path / "a")
    cancel(rt.ledger, cancelled)
    _other, job_id = one_job_batch(rt, tmp_path / "b", "Sentiment: 'fine'")
    backend = script(rt, "slm", GOOD)
    assert attempt_job(rt, job_id, "slm") is None
    with rt.ledger.session() as s:
        assert s.get_one(Job, job_id).status == JobStatus.SUCCEEDED
    assert backend.calls == 1
