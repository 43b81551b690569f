"""`tierfleet submit | status | results | cancel | retry` on the real Redis and Postgres."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select
from typer.testing import CliRunner

from tests.conftest import ROOT, Workers, wait_until
from tierfleet.cli import app
from tierfleet.constants import TASK_TRIAGE_RANGE, JobStatus
from tierfleet.db import Ledger
from tierfleet.models import Attempt, Batch, Job
from tierfleet.settings import Settings

pytestmark = pytest.mark.e2e
runner = CliRunner()


def envelope(i: int, **fields: Any) -> dict[str, Any]:
    return {"feature": "reviews", "prompt": f"Review {i}: works fine",
            "output_schema": "sentiment", "max_tokens": 64, **fields}  # fmt: skip


def write_jsonl(path: Path, rows: list[Any], *, tail: bytes = b"") -> Path:
    with path.open("wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else json.dumps(row).encode())
            f.write(b"\n")
        f.write(tail)
    return path


def cli(*args: str) -> Any:
    return runner.invoke(app, list(args))


def jobs_in_db(ledger: Ledger) -> int:
    with ledger.session() as s:
        return s.execute(select(func.count()).select_from(Job)).scalar_one()


def chunk_messages(redis_url: str, queue: str = "triage") -> list[tuple[str, int, int]]:
    with redis.Redis.from_url(redis_url) as r:
        out = []
        for raw in r.lrange(queue, 0, -1):
            message = json.loads(raw)
            assert message["headers"]["task"] == TASK_TRIAGE_RANGE
            body = json.loads(__import__("base64").b64decode(message["body"]))
            out.append(tuple(body[0]))
        return out  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (b'{"feature": "f", "prompt": "caf\xe9"}', "line 2: not UTF-8: byte 0xe9 at column 32"),
        (b'{"feature": "f", "prompt": ', "line 2: not JSON"),
        (b'{"feature": "f", "prompt": "x", "route": "gpu"}', "line 2, field 'route': unknown tier"),
        (b'{"feature": "f", "prompt": "x", "max_tokens": 0}', "line 2, field 'max_tokens'"),
        (b'{"prompt": "no feature"}', "line 2, field 'feature': required field"),
        (b"[1, 2]", "line 2: a job envelope is a JSON object, not list"),
        (b'{"feature": "f", "prompt": "' + b"x" * 1_000_100 + b'"}', "line 2: 1,000,1"),
    ],
    ids=["non-utf8", "not-json", "bad-route", "bad-field", "missing-feature", "not-object",
         "oversized"],
)  # fmt: skip
def test_a_bad_line_is_named_and_nothing_is_written(
    settings: Settings, ledger: Ledger, redis_url: str, tmp_path: Path, line: bytes, words: str
) -> None:
    path = write_jsonl(tmp_path / "jobs.jsonl", [envelope(1), line, envelope(3)])
    result = cli("submit", str(path))
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert "nothing was submitted" in result.output
    assert jobs_in_db(ledger) == 0 and chunk_messages(redis_url) == []


def test_a_truncated_last_line_and_duplicate_ids_are_named(
    settings: Settings, ledger: Ledger, tmp_path: Path
) -> None:
    rows = [envelope(1, id="a"), envelope(2, idempotency_key="k"), envelope(3, id="a"),
            envelope(4, idempotency_key="k")]  # fmt: skip
    path = write_jsonl(tmp_path / "jobs.jsonl", rows, tail=b'{"feature": "f", "prom')
    result = cli("submit", str(path), "--json")
    assert result.exit_code == 2
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["invalid"] == 3 and report["batch_id"] is None
    assert {(e["line"], e["field"]) for e in report["errors"]} == {
        (3, "id"),
        (4, "idempotency_key"),
        (5, ""),
    }
    messages = {e["line"]: e["error"] for e in report["errors"]}
    assert messages[3] == "duplicate id 'a' (first on line 1)"
    assert "the last line is cut short" in messages[5]
    assert jobs_in_db(ledger) == 0


def test_skip_invalid_submits_the_rest_and_writes_the_rejects(
    settings: Settings, ledger: Ledger, redis_url: str, tmp_path: Path
) -> None:
    rows = [envelope(1), b"not json", b"", envelope(4), {"feature": "f"}]
    path = write_jsonl(tmp_path / "jobs.jsonl", rows)
    result = cli("submit", str(path), "--skip-invalid", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["written"], summary["invalid"], summary["blank"]) == (2, 2, 1)
    rejects = [
        json.loads(x) for x in (tmp_path / "jobs.jsonl.rejects.jsonl").read_text().splitlines()
    ]
    assert [(r["line"], r["field"]) for r in rejects] == [(2, ""), (5, "prompt")]
    with ledger.session() as s:
        lines = sorted(s.execute(select(Job.line)).scalars())
    assert lines == [1, 4]
    assert chunk_messages(redis_url) == [(summary["batch_id"], 1, 5)]  # the chunk's span


def test_gzip_and_stdin_and_batch_defaults(
    settings: Settings, ledger: Ledger, tmp_path: Path
) -> None:
    rows = [{"prompt": f"Review {i}"} for i in range(3)]
    gz = tmp_path / "jobs.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    result = cli("submit", str(gz), "--feature", "imports", "--route", "frontier", "--json")
    assert result.exit_code == 0, result.output
    stdin = "\n".join(json.dumps({**r, "feature": "piped"}) for r in rows) + "\n"
    piped = runner.invoke(app, ["submit", "-", "--json"], input=stdin)
    assert piped.exit_code == 0, piped.output
    with ledger.session() as s:
        got = sorted(tuple(r) for r in s.execute(select(Job.feature, Job.route, Job.latency)))
    assert got == [("imports", "frontier", "batch")] * 3 + [("piped", "auto", "batch")] * 3


def test_a_rerun_enqueues_nothing_new(
    settings: Settings, ledger: Ledger, redis_url: str, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "jobs.jsonl", [envelope(i) for i in range(2500)])
    first = json.loads(cli("submit", str(path), "--json").stdout)
    again = json.loads(cli("submit", str(path), "--json").stdout)
    assert first["batch_id"] == again["batch_id"]
    assert (first["written"], first["chunks_enqueued"]) == (2500, 2)
    assert (again["written"], again["chunks_enqueued"]) == (0, 0)
    assert jobs_in_db(ledger) == 2500
    assert sorted(chunk_messages(redis_url)) == [(first["batch_id"], 1, 2000),
                                                 (first["batch_id"], 2001, 2500)]  # fmt: skip


def test_a_submit_killed_half_way_resumes_exactly(
    settings: Settings,
    ledger: Ledger,
    redis_url: str,
    fleet_env: dict[str, str],
    tmp_path: Path,
    start_workers: Callable[..., Workers],
) -> None:
    n = 100_000
    path = write_jsonl(tmp_path / "jobs.jsonl", [envelope(i) for i in range(n)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "tierfleet", "submit", str(path), "--json"],
        env=fleet_env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while jobs_in_db(ledger) < n * 0.3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)  # a tight poll: the whole file takes about a second to write
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written_before = jobs_in_db(ledger)
    assert 0 < written_before < n, "the kill came too late to test a resume"

    resumed = runner.invoke(app, ["submit", str(path), "--json"])
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads(resumed.stdout)
    assert summary["resumed_from_line"] > 0
    assert summary["written"] == n - written_before
    with ledger.session() as s:
        lines = s.execute(select(Job.line).order_by(Job.line)).scalars().all()
    assert lines == list(range(1, n + 1))  # every line once
    covered = sorted(r for _, a, b in chunk_messages(redis_url) for r in range(a, b + 1))
    assert set(covered) == set(range(1, n + 1))
    assert len(covered) - n <= 2000  # at most the chunk in flight at the kill, sent twice


def test_duplicate_chunk_messages_triage_each_job_once(
    settings: Settings,
    ledger: Ledger,
    tmp_path: Path,
    start_workers: Callable[..., Workers],
) -> None:
    """What a resume may send twice (the chunk in flight at a crash) runs once."""
    from tierfleet.transport import make_celery

    path = write_jsonl(tmp_path / "jobs.jsonl", [envelope(i) for i in range(200)])
    batch = json.loads(cli("submit", str(path), "--json").stdout)["batch_id"]
    celery = make_celery(settings)
    for _ in range(3):
        celery.send_task(TASK_TRIAGE_RANGE, args=[batch, 1, 200], queue=settings.queue_triage)
    celery.close()
    start_workers("all", concurrency=8)
    wait_until(lambda: json.loads(cli("status", batch, "--json").stdout)["done"] == 200,
               timeout_s=60, what="the batch")  # fmt: skip
    with ledger.session() as s:
        slm_attempts = s.execute(
            select(Attempt.job_id, func.count()).where(Attempt.tier == "slm")
            .group_by(Attempt.job_id)
        ).all()  # fmt: skip
    assert slm_attempts and all(n == 1 for _, n in slm_attempts)


def test_follow_a_batch_status_results_cancel_retry(
    settings: Settings,
    ledger: Ledger,
    tmp_path: Path,
    start_workers: Callable[..., Workers],
) -> None:
    rows = [envelope(i) for i in range(30)] + [envelope(i, route="frontier") for i in range(30, 40)]
    path = write_jsonl(tmp_path / "jobs.jsonl", rows)
    batch = json.loads(cli("submit", str(path), "--json").stdout)["batch_id"]

    # frontier answers always invalid: the ten frontier jobs fail
    broken = start_workers(
        "all", TIERFLEET_SIM_FRONTIER_INVALID_RATE="1.0", TIERFLEET_SIM_INVALID_RATE="0"
    )
    result = cli("status", batch, "--watch", "--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["by_status"] == {"succeeded": 30, "failed": 10} and status["done"] == 40
    assert status["by_tier"] == {"slm": 30, "frontier": 10}
    assert float(status["spend_usd"]) > 0

    records = [json.loads(x) for x in cli("results", batch).stdout.splitlines()]
    assert [r["line"] for r in records] == list(range(1, 41))  # input order
    assert all(r["status"] == "succeeded" and r["result"]["label"] for r in records[:30])
    assert all(r["status"] == "failed" and "still invalid" in r["error"] for r in records[30:])

    out = tmp_path / "results.jsonl"
    assert cli("results", batch, "-o", str(out)).exit_code == 0
    assert len(out.read_text().splitlines()) == 40

    broken.stop()
    retried = json.loads(cli("retry", batch, "--failed", "--json").stdout)
    assert retried == {"batch_id": batch, "retried": 10}
    start_workers("all")  # a fleet whose frontier answers are valid again
    wait_until(lambda: json.loads(cli("status", batch, "--json").stdout)["by_status"]
               == {"succeeded": 40}, timeout_s=60, what="the retried jobs")  # fmt: skip
    with ledger.session() as s:
        again = s.execute(select(Job).where(Job.line == 31)).scalar_one()
        assert again.attempt_count == 3 and again.attempt_floor == 2  # history kept


def test_cancel_stops_unstarted_jobs(
    settings: Settings, ledger: Ledger, tmp_path: Path, start_workers: Callable[..., Workers]
) -> None:
    path = write_jsonl(tmp_path / "jobs.jsonl", [envelope(i) for i in range(50)])
    batch = json.loads(cli("submit", str(path), "--json").stdout)["batch_id"]
    cancelled = json.loads(cli("cancel", batch, "--json").stdout)
    assert cancelled == {"batch_id": batch, "cancelled": 50}
    workers = start_workers("all", TIERFLEET_LOG_LEVEL="DEBUG")  # a line per chunk
    with ledger.session() as s:
        assert s.get(Batch, batch).cancelled_at is not None  # type: ignore[union-attr]
    # the chunk message is consumed and finds nothing to triage
    wait_until(lambda: "triage.range" in workers.output(), timeout_s=30, what="the chunk")
    with ledger.session() as s:
        statuses = set(s.execute(select(Job.status)).scalars())
        assert statuses == {JobStatus.CANCELLED}
        assert s.execute(select(func.sum(Job.attempt_count))).scalar_one() == 0


def test_unknown_batch_is_exit_4(settings: Settings) -> None:
    for command in (["status", "nope"], ["results", "nope"], ["cancel", "nope"],
                    ["retry", "nope", "--failed"]):  # fmt: skip
        result = cli(*command)
        assert result.exit_code == 4, (command, result.output)
        assert "no batch with id 'nope'" in result.output


def test_a_batch_id_reused_for_other_content_is_refused(
    settings: Settings, ledger: Ledger, tmp_path: Path
) -> None:
    first = write_jsonl(tmp_path / "a.jsonl", [envelope(i) for i in range(3)])
    other = write_jsonl(tmp_path / "b.jsonl", [envelope(i) for i in range(5)])
    assert cli("submit", str(first), "--batch-id", "nightly-1").exit_code == 0
    result = cli("submit", str(other), "--batch-id", "nightly-1")
    assert result.exit_code == 2
    assert "batch 'nightly-1' was submitted from other content" in result.output
    assert jobs_in_db(ledger) == 3


def test_a_line_whose_id_belongs_to_another_job_is_named(
    settings: Settings, ledger: Ledger, tmp_path: Path
) -> None:
    taken = write_jsonl(tmp_path / "a.jsonl", [envelope(1, id="order-7")])
    assert cli("submit", str(taken)).exit_code == 0
    clash = write_jsonl(tmp_path / "b.jsonl", [envelope(2), envelope(3, id="order-7")])
    result = cli("submit", str(clash), "--json")
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(2, "id")]
    assert "belongs to another job" in report["errors"][0]["error"]
    assert jobs_in_db(ledger) == 1  # the first batch's job, untouched; nothing half-applied


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--feature", "bad feature!"], "--feature: "),
        (["--route", "gpu"], "--route: unknown tier 'gpu'"),
        (["--latency", "soon"], "--latency: "),
        (["--batch-id", "x" * 41], "--batch-id must be 1-40"),
        (["--spend-cap-usd", "lots"], "--spend-cap-usd must be a number"),
        (["--spend-cap-usd", "-5"], "0 or more"),
    ],
)
def test_bad_batch_options_are_refused_before_reading(
    settings: Settings, ledger: Ledger, tmp_path: Path, args: list[str], words: str
) -> None:
    path = write_jsonl(tmp_path / "jobs.jsonl", [envelope(1)])
    result = cli("submit", str(path), *args)
    assert result.exit_code == 2 and words in result.output
    assert jobs_in_db(ledger) == 0


def test_a_corrupt_gzip_is_named_and_nothing_is_kept(
    settings: Settings, ledger: Ledger, tmp_path: Path
) -> None:
    whole = gzip.compress(b"".join(json.dumps(envelope(i)).encode() + b"\n" for i in range(5000)))
    path = tmp_path / "jobs.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    result = cli("submit", str(path))
    assert result.exit_code == 2
    assert "cannot read past line" in result.output
    assert jobs_in_db(ledger) == 0


def test_a_cancelled_batch_takes_no_more_lines(
    settings: Settings, ledger: Ledger, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "jobs.jsonl", [envelope(i) for i in range(3)])
    batch = json.loads(cli("submit", str(path), "--json").stdout)["batch_id"]
    assert cli("cancel", batch).exit_code == 0
    again = cli("submit", str(path))
    assert again.exit_code == 2 and "was cancelled" in again.output


def test_a_chunk_that_fails_to_commit_is_written_again_on_resume(
    settings: Settings, ledger: Ledger, redis_url: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from producers import bulk, copy
    from producers.jsonl import open_input
    from tierfleet.transport import make_celery

    path = write_jsonl(tmp_path / "jobs.jsonl", [envelope(i) for i in range(9000)])
    real = copy.copy_rows

    def flaky(conn: Any, rows: list[bytes], batch_id: str) -> Any:
        if b"\t2001\t" in rows[0]:  # the second chunk: lines 2001-4000
            raise RuntimeError("connection lost")
        return real(conn, rows, batch_id)

    monkeypatch.setattr(bulk, "copy_rows", flaky)
    celery = make_celery(settings)
    with open_input(str(path)) as source, pytest.raises(RuntimeError, match="connection lost"):
        bulk.submit(source, bulk.BatchOptions(), ledger, celery, settings.queue_triage)
    with ledger.session() as s:
        mark = s.execute(select(Batch.written_through)).scalar_one()
    assert mark < 2001  # never past the chunk that failed, whatever committed after it
    assert chunk_messages(redis_url) == []  # nothing enqueued

    monkeypatch.setattr(bulk, "copy_rows", real)
    with open_input(str(path)) as source:
        report = bulk.submit(source, bulk.BatchOptions(), ledger, celery, settings.queue_triage)
    celery.close()
    assert report.submitted and jobs_in_db(ledger) == 9000
    with ledger.session() as s:
        lines = s.execute(select(Job.line).order_by(Job.line)).scalars().all()
    assert lines == list(range(1, 9001))


def test_submit_wait_follows_a_capped_batch_to_its_end_and_says_it_was_cut_short(
    settings: Settings, ledger: Ledger, tmp_path: Path, start_workers: Callable[..., Workers]
) -> None:
    path = write_jsonl(tmp_path / "jobs.jsonl", [envelope(i, route="slm") for i in range(60)])
    start_workers("all", concurrency=2)
    result = cli("submit", str(path), "--spend-cap-usd", "0.00002", "--wait", "--json")
    assert result.exit_code == 1, result.output  # the work did not all get done
    status = json.loads(result.stdout)["status"]
    by_status = status["by_status"]
    assert status["done"] == 60 and set(by_status) == {"succeeded", "cancelled"}
    assert by_status["cancelled"] > 30  # a few calls' worth of cap
    batch = status["batch_id"]
    with ledger.session() as s:
        spent = s.get_one(Batch, batch).spent_usd
        billed = s.execute(
            select(func.sum(Attempt.cost_usd)).join(Job).where(Job.batch_id == batch)
        ).scalar_one()
    assert spent == billed == Decimal(status["spend_usd"])
    records = [json.loads(x) for x in cli("results", batch).stdout.splitlines()]
    cut = [r for r in records if r["status"] == "cancelled"]
    assert cut and all("spend cap" in r["error"] and r["attempts"] == 0 for r in cut)
