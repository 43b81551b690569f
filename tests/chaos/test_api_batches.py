"""`tierfleet serve` SIGKILLed in the middle of `POST /v1/batches`, then started again: the
batch is finished (not left `in_progress` with jobs nobody sends), every request is
answered exactly once, and no copy of the input is left on disk. And a create sent twice
with one Idempotency-Key is one batch, one set of jobs, one bill."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from sqlalchemy import func, select

from producers.api import tokens
from tests.conftest import ROOT, Workers, wait_until
from tests.e2e.conftest import Api, _free_port, api, serve_api  # noqa: F401
from tests.e2e.test_openai_batches import batch_file, sdk
from tierfleet.constants import JobStatus, Outcome
from tierfleet.db import Ledger
from tierfleet.models import ApiBatch, Attempt, Batch, Job

pytestmark = pytest.mark.chaos

REQUESTS = 10_000


class Server:
    """`tierfleet serve` as a process of its own, on a free port."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log, self.port = env, log, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tierfleet", "serve", "--port", str(self.port),
                 "--loglevel", "WARNING"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            )  # fmt: skip
        wait_until(self._up, timeout_s=30, what="tierfleet serve to answer")

    def _up(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                return response.status == 200  # type: ignore[no-any-return]
        except (urllib.error.URLError, ConnectionError):
            return False

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@pytest.fixture
def server(fleet_env: dict[str, str], tmp_path: Path) -> Iterator[Server]:
    spool = tmp_path / "tmp"  # the server's temporary directory, to see what it leaves
    spool.mkdir()
    served = Server({**fleet_env, "TMPDIR": str(spool)}, tmp_path / "serve.log")
    yield served
    served.stop()


def _jobs(ledger: Ledger) -> int:
    with ledger.session() as s:
        return int(s.execute(select(func.count()).select_from(Job)).scalar_one())


def _create(client: OpenAI, file_id: str, key: str | None) -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    return client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                 completion_window="24h", extra_headers=headers)  # fmt: skip


def _cut_short(client: OpenAI, file_id: str, key: str) -> None:
    """The create, as a client whose connection the crash cuts."""
    with contextlib.suppress(openai.APIConnectionError):
        _create(client, file_id, key)


def _answered_once(ledger: Ledger, client: OpenAI, batch_id: str, n: int) -> None:
    finished = client.batches.retrieve(batch_id)
    assert finished.request_counts is not None and finished.request_counts.completed == n
    assert finished.output_file_id is not None and finished.error_file_id is None
    lines = client.files.content(finished.output_file_id).text.splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in lines) == sorted(
        f"review-{i}" for i in range(n)
    )  # every request, each once
    with ledger.session() as s:
        jobs = s.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        billed = s.execute(
            select(Attempt.job_id, func.count())
            .where(Attempt.outcome == Outcome.SUCCEEDED)
            .group_by(Attempt.job_id)
            .having(func.count() > 1)
        ).all()
        batches = s.execute(select(func.count()).select_from(Batch)).scalar_one()
    assert jobs == [(JobStatus.SUCCEEDED, n)] and billed == [] and batches == 1


@pytest.mark.timeout(600)
def test_a_server_killed_mid_create_finishes_the_batch_when_started_again(
    server: Server,
    ledger: Ledger,
    start_workers: Callable[..., Workers],
    tmp_path: Path,
) -> None:
    server.start()
    token = tokens.create(ledger, "growth")[1]
    client = sdk(Api(server.url, ledger), token)
    path = batch_file(tmp_path / "big.jsonl", REQUESTS)
    uploaded = client.files.create(file=path, purpose="batch")

    post = threading.Thread(target=_cut_short, args=(client, uploaded.id, "nightly-1"))
    post.start()
    wait_until(lambda: _jobs(ledger) > 0, timeout_s=60, what="the first jobs written")
    server.kill()
    post.join(30)
    written = _jobs(ledger)
    with ledger.session() as s:
        (row,) = s.execute(select(ApiBatch)).scalars()
        sent = s.execute(select(Batch.enqueued_through)).scalar_one()
    assert row.state == "submitting" and (written < REQUESTS or sent == 0)  # mid-submit
    assert list((tmp_path / "tmp").iterdir()) == []  # no copy of the input left behind

    server.start()  # starting, it finishes what the crash left: no request needed
    wait_until(lambda: _state(ledger, row.id) == "submitted", timeout_s=120,
               what="the restarted server to finish the submission")  # fmt: skip
    assert (_jobs(ledger), _enqueued(ledger)) == (REQUESTS, REQUESTS)
    listed = client.batches.list()
    assert [b.id for b in listed.data] == [row.id]
    assert listed.data[0].status == "in_progress"
    assert _create(client, uploaded.id, "nightly-1").id == row.id  # the retry: the same batch

    start_workers("all", concurrency=8)
    wait_until(lambda: client.batches.retrieve(row.id).status == "completed", timeout_s=300,
               what="the batch to complete")  # fmt: skip
    _answered_once(ledger, client, row.id, REQUESTS)


def _state(ledger: Ledger, batch_id: str) -> str:
    with ledger.session() as s:
        return s.get_one(ApiBatch, batch_id).state


def test_a_batch_whose_creator_died_is_finished_by_the_next_read_of_it(
    api: Api,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A server that lives on while another (its creator) died: reading the batch, as
    every client polling it does, finishes the submission the crash cut short."""
    client = sdk(api, api.token("growth"))
    uploaded = client.files.create(file=batch_file(tmp_path / "r.jsonl", 20), purpose="batch")
    with api.ledger.begin() as conn:  # what a creator killed before its first job leaves
        conn.execute(
            ApiBatch.__table__.insert().values(
                id="batch_cutshort", team="growth", input_file_id=uploaded.id,
                endpoint="/v1/chat/completions", completion_window="24h",
                batch_id="b-batch_cutshort", requests=20, state="submitting",
            )
        )  # fmt: skip
    assert _jobs(api.ledger) == 0
    read = client.batches.retrieve("batch_cutshort")
    assert read.status == "in_progress" and read.request_counts.total == 20  # type: ignore[union-attr]
    assert _state(api.ledger, "batch_cutshort") == "submitted"
    assert (_jobs(api.ledger), _enqueued(api.ledger)) == (20, 20)


def _enqueued(ledger: Ledger) -> int:
    with ledger.session() as s:
        return int(s.execute(select(Batch.enqueued_through)).scalar_one())


def test_one_idempotency_key_sent_twice_is_one_batch_and_one_bill(
    api: Api,  # noqa: F811
    start_workers: Callable[..., Workers],
    tmp_path: Path,
) -> None:
    client = sdk(api, api.token("growth"))
    uploaded = client.files.create(file=batch_file(tmp_path / "r.jsonl", 30), purpose="batch")
    other = client.files.create(file=batch_file(tmp_path / "s.jsonl", 3), purpose="batch")
    key = "nightly-2026-12-03"

    made: list[Any] = []
    at_once = [threading.Thread(target=lambda: made.append(_create(client, uploaded.id, key)))
               for _ in range(2)]  # fmt: skip
    for thread in at_once:
        thread.start()
    for thread in at_once:
        thread.join(60)
    made.append(_create(client, uploaded.id, key))
    assert len(made) == 3 and len({b.id for b in made}) == 1

    with pytest.raises(openai.ConflictError) as reused:  # the same key for another file
        _create(client, other.id, key)
    error = reused.value.body
    assert error["param"] == "Idempotency-Key" and key in error["message"]  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):  # another team's same key is its own
        _create(sdk(api, api.token("search")), uploaded.id, key)

    start_workers("all")
    batch_id = made[0].id
    wait_until(lambda: client.batches.retrieve(batch_id).status == "completed", timeout_s=90,
               what="the batch to complete")  # fmt: skip
    _answered_once(api.ledger, client, batch_id, 30)
    assert _create(client, uploaded.id, None).id != batch_id  # without a key: a new batch
