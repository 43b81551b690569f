"""Message Batches on the real Postgres, through the real `anthropic` SDK to the fake API.

Batch-mode frontier attempts are collected in the ledger, sent as provider batches by the
size rule, and their results booked exactly once at the batch price, whatever ends them."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.fakes import Answer, Error, Invalid, NotRun
from tests.integration.test_steps import new_job
from tierfleet import finops
from tierfleet.constants import JobStatus, Outcome
from tierfleet.db import Ledger
from tierfleet.models import Attempt, BatchRequest, Job, ProviderBatch
from tierfleet.settings import Settings
from tierfleet.transport import make_celery
from workers import message_batches
from workers.backends.anthropic_api import AnthropicBackend
from workers.execute import Next, attempt_job, triage_job
from workers.runtime import Runtime

pytestmark = pytest.mark.integration

# claude-sonnet-4-6 in the price file: $3 / $15 per million tokens in / out, cache writes
# 1.25x and reads 0.1x the input price; Message Batches at half of all of it.
BATCH_USD_PER_MTOK = {
    "input": Decimal("1.5"), "output": Decimal("7.5"),
    "cache_write": Decimal("1.875"), "cache_read": Decimal("0.15"),
}  # fmt: skip


class Sent:
    """What the batch task asked to send next (no worker here: the test plays it)."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Next]] = []

    def __call__(self, rt: Runtime, job_id: str, step: Next) -> None:
        self.steps.append((job_id, step))

    def replay(self, rt: Runtime) -> None:
        """Run each sent attempt, as a frontier worker would: collected again."""
        steps, self.steps = self.steps, []
        for job_id, step in steps:
            assert attempt_job(rt, job_id, step.tier) is None


@pytest.fixture
def brt(settings: Settings, ledger: Ledger, fake_anthropic: Any) -> Iterator[Runtime]:
    batch_settings = settings.model_copy(
        update={"message_batches": "auto", "batch_min_requests": 1000, "batch_max_wait_s": 3600}
    )
    celery = make_celery(batch_settings)
    rt = Runtime.build(batch_settings, celery, ledger)
    rt.backends["frontier"] = AnthropicBackend(
        api_key="sk-ant-test", base_url=fake_anthropic.base_url,
        model=batch_settings.frontier_model,
    )  # fmt: skip
    yield rt
    rt.close()
    celery.close()


def _set(rt: Runtime, **values: Any) -> None:
    rt.settings = rt.settings.model_copy(update=values)


def collect(rt: Runtime, prompts: list[str]) -> list[str]:
    """Jobs that can wait, routed to the frontier: each attempt is collected, not called."""
    ids = []
    for prompt in prompts:
        job_id = new_job(rt, route="frontier", latency="batch", prompt=prompt)
        assert triage_job(rt, job_id) == Next("frontier")
        assert attempt_job(rt, job_id, "frontier") is None
        ids.append(job_id)
    return ids


def _waiting(rt: Runtime) -> int:
    with rt.ledger.session() as s:
        return s.execute(select(func.count()).where(BatchRequest.batch_id.is_(None))).scalar_one()


def _batches(rt: Runtime) -> list[ProviderBatch]:
    with rt.ledger.session() as s:
        return list(s.execute(select(ProviderBatch).order_by(ProviderBatch.created_at)).scalars())


def _jobs(rt: Runtime, ids: list[str]) -> dict[str, Job]:
    with rt.ledger.session() as s:
        return {j.id: j for j in s.execute(select(Job).where(Job.id.in_(ids))).scalars()}


def _attempts(rt: Runtime) -> list[Attempt]:
    with rt.ledger.session() as s:
        return list(s.execute(select(Attempt).order_by(Attempt.job_id, Attempt.seq)).scalars())


def _hand_priced(usage: dict[str, int]) -> Decimal:
    tokens = {
        "input": usage["input_tokens"], "output": usage["output_tokens"],
        "cache_write": usage.get("cache_creation_input_tokens") or 0,
        "cache_read": usage.get("cache_read_input_tokens") or 0,
    }  # fmt: skip
    total = sum(tokens[k] * BATCH_USD_PER_MTOK[k] for k in tokens) / Decimal(1_000_000)
    return Decimal(total).quantize(Decimal("0.00000001"))


def test_2500_jobs_go_out_in_provider_batches_by_the_size_rule(
    brt: Runtime, fake_anthropic: Any
) -> None:
    sent = Sent()
    ids = collect(brt, [f"Sentiment of review {i}: 'fine'" for i in range(2500)])
    assert fake_anthropic.requests == []  # nothing called in real time
    with brt.ledger.session() as s:
        leased = s.execute(select(func.min(Job.lease_until))).scalar_one()
    assert all(j.status == JobStatus.RUNNING for j in _jobs(brt, ids).values())
    assert leased is not None  # held for the provider batch, past any real-time timeout

    _set(brt, batch_max_requests=1000)
    report = message_batches.run(brt, sent)
    assert [b.requests for b in _batches(brt)] == [1000, 1000]  # due: 1000 waited, twice
    assert _waiting(brt) == 500  # fewer than N, and the oldest has not waited T
    assert len(report.submitted) == 2

    # by bytes: a byte budget of about 120 requests cuts the rest into batches under it
    per_request = _batches(brt)[0].request_bytes // 1000
    _set(brt, batch_max_wait_s=0, batch_max_bytes=per_request * 120)
    message_batches.run(brt, sent)
    sizes = [b.requests for b in _batches(brt)]
    assert sum(sizes) == 2500 and _waiting(brt) == 0
    assert all(b.request_bytes <= brt.settings.batch_max_bytes for b in _batches(brt)[2:])
    assert len(sizes) > 3 and max(sizes[2:]) < 500

    # every batch ended at once (processing time 0): the next pass ingests them all
    message_batches.run(brt, sent)
    jobs = _jobs(brt, ids)
    assert {j.status for j in jobs.values()} == {JobStatus.SUCCEEDED}
    custom_ids = [r["custom_id"] for b in fake_anthropic.batches.values() for r in b.requests]
    assert len(custom_ids) == len(set(custom_ids)) == 2500
    attempts = _attempts(brt)
    assert len(attempts) == 2500 and {a.id for a in attempts} == set(custom_ids)
    assert all(a.provider_batch_id is not None for a in attempts)
    assert sent.steps == []


def test_mixed_results_each_end_in_the_right_state(brt: Runtime, fake_anthropic: Any) -> None:
    fake_anthropic.when("review-ok", Answer())
    fake_anthropic.when("review-invalid-once", Invalid())
    fake_anthropic.when("review-invalid-always", Invalid(), Invalid())
    fake_anthropic.when("review-overloaded", Error(529))
    fake_anthropic.when("review-refused", Error(400, message="prompt is too long"))
    fake_anthropic.when("review-expired-once", NotRun("expired"))
    fake_anthropic.when("review-expired-twice", NotRun("expired"), NotRun("expired"))
    fake_anthropic.when("review-canceled-twice", NotRun("canceled"), NotRun("canceled"))
    names = [
        "ok", "invalid-once", "invalid-always", "overloaded", "refused", "expired-once",
        "expired-twice", "canceled-twice",
    ]  # fmt: skip
    ids = dict(
        zip(names, collect(brt, [f"Sentiment, review-{n}: 'ok'" for n in names]), strict=True)
    )
    _set(brt, batch_max_wait_s=0, retry_base_delay_s=0)
    sent = Sent()
    for _ in range(4):  # each round: send, ingest, and play what comes next
        message_batches.run(brt, sent)
        sent.replay(brt)
    jobs = {n: _jobs(brt, [i])[i] for n, i in ids.items()}
    status = {n: j.status for n, j in jobs.items()}
    assert status == {
        "ok": JobStatus.SUCCEEDED,
        "invalid-once": JobStatus.SUCCEEDED,  # invalid on the top tier: asked again once
        "invalid-always": JobStatus.FAILED,
        "overloaded": JobStatus.SUCCEEDED,  # `errored`: a transient fault, retried
        "refused": JobStatus.FAILED,  # `errored` invalid_request_error: permanent
        "expired-once": JobStatus.SUCCEEDED,  # sent again once
        "expired-twice": JobStatus.FAILED,
        "canceled-twice": JobStatus.FAILED,
    }
    assert "prompt is too long" in (jobs["refused"].error or "")
    assert "expired" in (jobs["expired-twice"].error or "")
    assert "canceled" in (jobs["canceled-twice"].error or "")
    by_job: dict[str, list[str]] = {}
    for a in _attempts(brt):
        by_job.setdefault(a.job_id, []).append(a.outcome)
    assert by_job[ids["expired-twice"]] == [Outcome.EXPIRED, Outcome.EXPIRED]
    assert by_job[ids["invalid-always"]] == [Outcome.INVALID, Outcome.INVALID]
    assert by_job[ids["overloaded"]] == [Outcome.ERROR, Outcome.SUCCEEDED]
    assert _waiting(brt) == 0 and sent.steps == []


def test_costs_are_the_hand_computed_batch_prices(brt: Runtime, fake_anthropic: Any) -> None:
    ids = collect(brt, [f"Sentiment of review {i}: 'great value'" for i in range(20)])
    _set(brt, batch_max_wait_s=0)
    sent = Sent()
    message_batches.run(brt, sent)
    message_batches.run(brt, sent)
    usage = {
        line["custom_id"]: line["result"]["message"]["usage"]
        for batch in fake_anthropic.batches.values()
        for line in batch.results
    }
    attempts = _attempts(brt)
    assert len(attempts) == 20
    assert any(a.cache_write_tokens or a.cache_read_tokens for a in attempts)  # cache priced too
    for a in attempts:
        assert a.cost_usd == _hand_priced(usage[a.id]) > 0
    jobs = _jobs(brt, ids)
    spent = sum(a.cost_usd for a in attempts)
    assert sum(j.cost_usd for j in jobs.values()) == spent
    # the cost report's own line: the same requests one by one cost twice as much
    report = finops.build(
        brt.ledger, since=dt.timedelta(hours=1), by="feature",
        frontier=brt.prices[brt.settings.frontier_model],
    )  # fmt: skip
    assert report.batch_attempts == 20 and report.batch_spend_usd == spent
    assert report.batch_standard_usd == 2 * spent and report.batch_savings_usd == spent


def test_a_batch_ingested_twice_bills_nothing_twice(brt: Runtime, fake_anthropic: Any) -> None:
    ids = collect(brt, [f"Sentiment of review {i}: 'meh'" for i in range(30)])
    _set(brt, batch_max_wait_s=0)
    sent = Sent()
    message_batches.run(brt, sent)
    message_batches.run(brt, sent)
    before = sum(j.cost_usd for j in _jobs(brt, ids).values())
    (batch,) = _batches(brt)
    assert batch.status == "ingested" and batch.ingested == 30
    again = message_batches.ingest(
        brt,
        brt.backends["frontier"],
        batch.id,
        batch.provider_batch_id or "",
        sent,  # type: ignore[arg-type]
    )
    assert again == 0
    assert len(_attempts(brt)) == 30
    assert sum(j.cost_usd for j in _jobs(brt, ids).values()) == before


def test_a_create_whose_answer_was_lost_is_adopted_not_sent_twice(
    brt: Runtime, fake_anthropic: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tierfleet.errors import ProviderTimeout

    collect(brt, [f"Sentiment of review {i}: 'ok'" for i in range(5)])
    _set(brt, batch_max_wait_s=0, batch_lock_s=0.001)
    backend = brt.backends["frontier"]
    real_create = backend.create_batch  # type: ignore[attr-defined]

    def created_then_timed_out(requests: list[dict[str, Any]]) -> Any:
        real_create(requests)
        raise ProviderTimeout("anthropic did not answer within 600.0s")

    monkeypatch.setattr(backend, "create_batch", created_then_timed_out)
    sent = Sent()
    message_batches.run(brt, sent)
    (batch,) = _batches(brt)
    assert batch.status == "submitting" and len(fake_anthropic.batches) == 1
    monkeypatch.setattr(backend, "create_batch", real_create)
    message_batches.run(brt, sent)  # the lock lapsed: found at the provider and adopted
    (batch,) = _batches(brt)
    assert len(fake_anthropic.batches) == 1
    assert batch.provider_batch_id in fake_anthropic.batches
    message_batches.run(brt, sent)
    assert len(_attempts(brt)) == 5 and {a.outcome for a in _attempts(brt)} == {Outcome.SUCCEEDED}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tierfleet", "batches", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_batches_command_lists_runs_and_cancels(
    brt: Runtime, fake_anthropic: Any, real_env: dict[str, str]
) -> None:
    collect(brt, [f"Sentiment of review {i}: 'ok'" for i in range(3)])
    env = {**real_env, "TIERFLEET_MESSAGE_BATCHES": "auto"}
    shown = json.loads(_cli(env, "--json").stdout)
    assert shown == {"waiting": 3, "batches": []}
    fake_anthropic.batch_processing_s = 3600
    ran = _cli(env, "run", "--force", "--json")
    assert ran.returncode == 0, ran.stderr
    assert len(json.loads(ran.stdout)["submitted"]) == 1
    (batch,) = json.loads(_cli(env, "--json").stdout)["batches"]
    assert batch["status"] == "in_progress" and batch["requests"] == 3
    cancelled = _cli(env, "cancel", batch["provider_batch_id"], "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout)["status"] == "ended"
    assert _cli(env, "run").returncode == 0  # ingests: three `canceled`, collected again
    (batch,) = json.loads(_cli(env, "--json").stdout)["batches"]
    assert (batch["status"], batch["canceled"], batch["ingested"]) == ("ingested", 3, 3)
    assert json.loads(_cli(env, "--json").stdout)["waiting"] == 0  # sent as messages
    # bad input: an unknown batch (exit 4), batches turned off (exit 2)
    unknown = _cli(env, "cancel", "msgbatch_nope")
    assert unknown.returncode == 4 and "no provider batch 'msgbatch_nope'" in unknown.stderr
    off = _cli({**env, "TIERFLEET_MESSAGE_BATCHES": "off"}, "run")
    assert off.returncode == 2 and "TIERFLEET_MESSAGE_BATCHES=off" in off.stderr


def test_a_create_that_never_reached_the_provider_is_sent_again(
    brt: Runtime, fake_anthropic: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tierfleet.errors import ProviderUnavailable

    ids = collect(brt, [f"Sentiment of review {i}: 'ok'" for i in range(4)])
    _set(brt, batch_max_wait_s=0, batch_lock_s=0.001)
    backend = brt.backends["frontier"]
    real_create = backend.create_batch  # type: ignore[attr-defined]

    def refused_connection(requests: list[dict[str, Any]]) -> Any:
        raise ProviderUnavailable("anthropic connection failed: connection refused")

    monkeypatch.setattr(backend, "create_batch", refused_connection)
    message_batches.run(brt, Sent())
    assert [b.status for b in _batches(brt)] == ["submitting"] and not fake_anthropic.batches
    monkeypatch.setattr(backend, "create_batch", real_create)
    report = message_batches.run(brt, Sent())  # not at the provider: sent again, same rows
    assert len(report.recovered) == 1 and len(fake_anthropic.batches) == 1
    (sent,) = fake_anthropic.batches.values()
    assert len(sent.requests) == 4
    assert {j.status for j in _jobs(brt, ids).values()} == {JobStatus.SUCCEEDED}
