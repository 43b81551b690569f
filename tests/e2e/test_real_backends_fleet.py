"""The fleet's worker processes with the REAL vLLM and Anthropic clients, against the fake
servers: a mixed batch, scripted faults, and the ledger checked against what the fakes
were asked."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from itertools import islice
from typing import Any

import pytest
from sqlalchemy import func, select

from producers import Client
from tests.conftest import FAKE_API_KEY, Workers, wait_until
from tests.e2e.test_fleet import all_terminal, hand_priced
from tests.fakes import Answer, Error, Invalid
from tierfleet.constants import JobStatus
from tierfleet.db import Ledger
from tierfleet.demo import example_jobs
from tierfleet.models import Attempt, Job

pytestmark = pytest.mark.e2e


def test_a_mixed_batch_through_the_real_clients(
    client: Client,
    ledger: Ledger,
    fake_vllm: Any,
    fake_anthropic: Any,
    real_env: dict[str, str],
    start_workers: Callable[..., Workers],
) -> None:
    fake_vllm.latency_s = 0.02
    for i in range(5):
        fake_vllm.when(f"[case invalid-{i}]", Invalid())
    fake_anthropic.when("[case rate-limited]", Error(429, retry_after_s=0.2), Answer())
    fake_anthropic.when("[case overloaded]", Error(529), Error(529), Answer())
    workers = start_workers("triage", "slm", "frontier", concurrency=4, **real_env)

    envelopes = list(islice(example_jobs(40, "real"), 40))
    envelopes += [
        {
            "feature": "reviews",
            "prompt": f"[case invalid-{i}] Sentiment of 'ok'",
            "output_schema": "sentiment",
        }
        for i in range(5)
    ]
    envelopes += [
        {
            "feature": "reviews",
            "prompt": f"[case {case}] Sentiment of 'fine'",
            "output_schema": "sentiment",
            "route": "frontier",
        }
        for case in ("rate-limited", "overloaded")
    ]
    ids = [client.submit(e) for e in envelopes]
    wait_until(
        lambda: all_terminal(ledger, len(ids)),
        timeout_s=90,
        what=f"{len(ids)} terminal jobs\n{workers.output()[-3000:]}",
    )

    with ledger.session() as s:
        statuses = Counter(s.execute(select(Job.status)).scalars())
        attempts = list(s.execute(select(Attempt).order_by(Attempt.job_id, Attempt.seq)).scalars())
        total = s.execute(select(func.sum(Job.cost_usd))).scalar_one()
    assert statuses == {JobStatus.SUCCEEDED: len(ids)}, workers.output()[-3000:]

    by_provider = Counter((a.provider, a.outcome.value) for a in attempts)
    assert by_provider[("vllm", "invalid")] >= 5
    assert by_provider[("anthropic", "error")] == 3  # one 429, two 529s, each retried once
    # every model call answered by a fake is exactly one attempt row: nothing billed twice
    answered_vllm = sum(1 for r in fake_vllm.requests if r.action is not None)
    answered_claude = sum(1 for r in fake_anthropic.requests if r.action is not None)
    assert answered_vllm == sum(n for (p, _), n in by_provider.items() if p == "vllm")
    assert answered_claude == sum(n for (p, _), n in by_provider.items() if p == "anthropic")
    for a in attempts:
        assert a.cost_usd == hand_priced(
            a.model, a.input_tokens, a.output_tokens, a.cache_write_tokens, a.cache_read_tokens
        )
    assert any(a.cache_write_tokens for a in attempts)  # tools and system prompts are cached
    assert total == sum(a.cost_usd for a in attempts)
    assert FAKE_API_KEY not in workers.output()


def test_jobs_that_can_wait_reach_claude_in_message_batches(
    client: Client,
    ledger: Ledger,
    fake_anthropic: Any,
    real_env: dict[str, str],
    start_workers: Callable[..., Workers],
) -> None:
    """The fleet as deployed: beat sends the batch task to a frontier worker, which sends
    the collected requests and ingests the ended batch; an invalid answer goes out again
    in a later batch."""
    fake_anthropic.when("[case invalid-once]", Invalid())
    env = {
        **real_env, "TIERFLEET_MESSAGE_BATCHES": "auto", "TIERFLEET_BATCH_MAX_WAIT_S": "0.3",
        "TIERFLEET_BATCH_INTERVAL_S": "0.3",
    }  # fmt: skip
    workers = start_workers("triage", "frontier", concurrency=4, TIERFLEET_BEAT="1", **env)
    envelopes = [
        {"feature": "reviews", "prompt": f"Sentiment of review {i}: 'fine'",
         "output_schema": "sentiment", "route": "frontier", "latency": "batch"}
        for i in range(24)
    ]  # fmt: skip
    envelopes[0]["prompt"] = "[case invalid-once] " + envelopes[0]["prompt"]
    ids = [client.submit(e) for e in envelopes]
    wait_until(
        lambda: all_terminal(ledger, len(ids)),
        timeout_s=90,
        what=f"{len(ids)} terminal jobs\n{workers.output()[-3000:]}",
    )
    with ledger.session() as s:
        statuses = Counter(s.execute(select(Job.status)).scalars())
        attempts = list(s.execute(select(Attempt)).scalars())
    assert statuses == {JobStatus.SUCCEEDED: len(ids)}, workers.output()[-3000:]
    assert fake_anthropic.requests == []  # not one real-time call
    assert len(fake_anthropic.batches) >= 2  # the invalid answer went out again, later
    assert len(attempts) == len(ids) + 1
    assert all(a.provider_batch_id is not None for a in attempts)
    sent = sum(len(b.requests) for b in fake_anthropic.batches.values())
    assert sent == len(attempts)  # one request per attempt, one attempt per request
