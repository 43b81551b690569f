"""A poller SIGKILLed mid-ingest of a provider batch, then run again: every result is
booked once, every job ends, and the ledger's spend is the hand-priced batch spend."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.conftest import wait_until
from tests.integration.test_message_batches import _hand_priced, brt, collect  # noqa: F401
from tierfleet.constants import JobStatus
from tierfleet.models import Attempt, Job, ProviderBatch
from workers import message_batches
from workers.runtime import Runtime

pytestmark = pytest.mark.chaos

JOBS = 1200  # three chunks of booking (500 results each)


def _booked(rt: Runtime) -> int:
    with rt.ledger.session() as s:
        return int(s.execute(select(func.count()).select_from(Attempt)).scalar_one())


def _poller(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tierfleet", "batches", "run", "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def test_a_poller_killed_mid_ingest_and_restarted_bills_nothing_twice(
    brt: Runtime,  # noqa: F811
    fake_anthropic: Any,
    real_env: dict[str, str],
) -> None:
    ids = collect(brt, [f"Sentiment of review {i}: 'fine'" for i in range(JOBS)])
    brt.settings = brt.settings.model_copy(update={"batch_max_wait_s": 0})
    fake_anthropic.batch_processing_s = 3600
    message_batches.run(brt, lambda *_: None)  # sent, and still in progress
    (provider_id,) = fake_anthropic.batches
    assert _booked(brt) == 0
    fake_anthropic.batches[provider_id].ends_at = 0  # the provider has finished it
    fake_anthropic.results_line_delay_s = 0.004  # the results stream takes a few seconds
    env = {**real_env, "TIERFLEET_MESSAGE_BATCHES": "auto", "TIERFLEET_BATCH_LOCK_S": "1"}

    first = _poller(env)
    wait_until(lambda: _booked(brt) >= 500, timeout_s=60, what="the first results booked")
    os.kill(first.pid, signal.SIGKILL)
    first.communicate(timeout=10)
    killed_at = _booked(brt)
    assert 500 <= killed_at < JOBS, killed_at  # mid-ingest, for real

    fake_anthropic.results_line_delay_s = 0.0

    def ingested() -> bool:
        again = _poller(env)
        out, _ = again.communicate(timeout=120)
        assert again.returncode == 0, out
        with brt.ledger.session() as s:
            return s.execute(select(ProviderBatch.status)).scalar_one() == "ingested"

    wait_until(ingested, timeout_s=60, what="the restarted poller to ingest the rest")
    with brt.ledger.session() as s:
        attempts = list(s.execute(select(Attempt)).scalars())
        jobs = list(s.execute(select(Job).where(Job.id.in_(ids))).scalars())
    assert len(attempts) == JOBS and len({a.id for a in attempts}) == JOBS
    assert {j.status for j in jobs} == {JobStatus.SUCCEEDED}
    usage = {
        line["custom_id"]: line["result"]["message"]["usage"]
        for line in fake_anthropic.batches[provider_id].results
    }
    hand = sum((_hand_priced(usage[a.id]) for a in attempts), Decimal(0))
    assert sum(a.cost_usd for a in attempts) == hand
    assert sum(j.cost_usd for j in jobs) == hand  # each job charged once
