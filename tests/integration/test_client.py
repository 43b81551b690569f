"""The producer client against the real Postgres and Redis (no workers running)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from producers import Client
from tierfleet.constants import TASK_TRIAGE, JobStatus
from tierfleet.db import Ledger
from tierfleet.errors import InvalidEnvelope, JobNotFound
from tierfleet.models import Job

pytestmark = pytest.mark.integration


def queued_messages(redis_url: str, queue: str) -> list[dict[str, Any]]:
    with redis.Redis.from_url(redis_url) as r:
        raw = r.lrange(queue, 0, -1)
    return [json.loads(m) for m in raw]


def job_count(ledger: Ledger) -> int:
    with ledger.session() as s:
        return s.execute(select(func.count()).select_from(Job)).scalar_one()


def test_submit_writes_the_job_and_sends_only_its_id(
    client: Client, ledger: Ledger, redis_url: str
) -> None:
    prompt = "Classify this ticket: my invoice is wrong " * 20
    job_id = client.submit({"feature": "support", "prompt": prompt, "output_schema": "sentiment"})

    view = client.get(job_id)
    assert (view.status, view.feature, view.attempts) == (JobStatus.QUEUED, "support", ())
    [message] = queued_messages(redis_url, client.settings.queue_triage)
    assert message["headers"]["task"] == TASK_TRIAGE
    assert message["headers"]["argsrepr"] == repr([job_id])
    assert prompt not in json.dumps(message)  # the payload stays in Postgres


def test_resubmitting_an_idempotency_key_returns_the_same_job(
    client: Client, ledger: Ledger, redis_url: str
) -> None:
    envelope = {"feature": "f", "prompt": "hello", "idempotency_key": "order-42"}
    first = client.submit(envelope)
    with ledger.session() as s:  # pretend triage took it
        s.get(Job, first).status = JobStatus.TRIAGED  # type: ignore[union-attr]
    second = client.submit({**envelope, "prompt": "a different prompt"})
    assert second == first
    assert job_count(ledger) == 1
    assert len(queued_messages(redis_url, client.settings.queue_triage)) == 1


def test_a_resubmit_of_a_job_still_queued_sends_its_triage_message_again(
    client: Client, redis_url: str
) -> None:
    envelope = {"feature": "f", "prompt": "hello", "idempotency_key": "lost-message"}
    assert client.submit(envelope) == client.submit(envelope)
    assert len(queued_messages(redis_url, client.settings.queue_triage)) == 2


@pytest.mark.parametrize(
    ("envelope", "field"),
    [
        ({"feature": "f", "prompt": "x", "output_schema": {"type": 12}}, "output_schema"),
        ({"feature": "f", "prompt": "x", "route": "gpt"}, "route"),
        ({"feature": "f"}, "prompt"),
    ],
)
def test_an_invalid_envelope_writes_and_sends_nothing(
    client: Client, ledger: Ledger, redis_url: str, envelope: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidEnvelope) as info:
        client.submit(envelope)
    assert info.value.field == field
    assert job_count(ledger) == 0
    assert queued_messages(redis_url, client.settings.queue_triage) == []


def test_get_an_unknown_job(client: Client) -> None:
    with pytest.raises(JobNotFound, match="no job with id 'nope'"):
        client.get("nope")


def test_client_repr_shows_no_secret(client: Client) -> None:
    assert "postgres" not in repr(client) or "@" not in repr(client)
    assert "Settings" not in repr(client)
