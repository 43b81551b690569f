"""The `tierfleet` command line against the real services."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from producers import Client
from tests.conftest import ROOT
from tierfleet.cli import app
from tierfleet.db import Ledger
from tierfleet.models import Job
from tierfleet.settings import Settings
from tierfleet.transport import make_celery

runner = CliRunner()
SUMMARY = re.compile(
    r"^summary: jobs=(\d+) succeeded=(\d+) failed=(\d+) escalated=(\d+) "
    r"cost_usd=([\d.]+) baseline_usd=([\d.]+) savings_pct=(-?[\d.]+) tiers=([a-z0-9_:.,]+)$"
)


def test_db_upgrade_is_idempotent(settings: Settings) -> None:
    for _ in range(2):
        result = runner.invoke(app, ["db", "upgrade"])
        assert result.exit_code == 0, result.output
        assert "is at revision head" in result.output


def test_db_upgrade_on_an_unreachable_database_hides_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://fleet:pg-Pa55word@127.0.0.1:1/ledger")
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 3
    assert "cannot reach postgresql+psycopg://fleet:***@127.0.0.1:1/ledger" in result.output
    assert "pg-Pa55word" not in result.output


def test_job_get_prints_the_job_as_json(settings: Settings, ledger: Ledger) -> None:
    client = Client(settings, ledger, make_celery(settings))
    job_id = client.submit({"feature": "f", "prompt": "hello"})
    client.close()
    result = runner.invoke(app, ["job", "get", job_id])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["id"], data["status"], data["attempts"]) == (job_id, "queued", [])


def test_job_get_unknown_is_exit_4(settings: Settings) -> None:
    result = runner.invoke(app, ["job", "get", "no-such-job"])
    assert result.exit_code == 4
    assert "no job with id 'no-such-job'" in result.output


def test_worker_rejects_an_unknown_pool() -> None:
    result = runner.invoke(app, ["worker", "--pool", "gpu"])
    assert result.exit_code == 2
    assert "--pool must be one of triage, slm, frontier, all" in result.output


def test_a_pool_of_another_ladder_is_named_with_the_fleet_file() -> None:
    fleet = ROOT / "examples" / "fleets" / "anthropic-only.toml"
    result = runner.invoke(app, ["worker", "--pool", "haiku"])
    assert result.exit_code == 2 and "(another ladder's tiers: --fleet FILE)" in result.output
    result = runner.invoke(app, ["worker", "--pool", "slm", "--fleet", str(fleet)])
    assert result.exit_code == 2
    assert "--pool must be one of triage, haiku, sonnet, opus, all, not 'slm'" in result.output


def run_demo(env: dict[str, str], jobs: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tierfleet", "demo", "--jobs", str(jobs)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_with_nothing_configured_ends_with_the_summary_line() -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("TIERFLEET_")
    }
    env["TIERFLEET_SIM_LATENCY_S"] = "0.01"
    proc = run_demo(env, 60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    match = SUMMARY.match(lines[-1])
    assert match, lines[-1]
    jobs, ok, failed, escalated = (int(g) for g in match.groups()[:4])
    cost, baseline = float(match.group(5)), float(match.group(6))
    assert jobs == 60 and ok + failed == jobs and escalated > 0
    assert 0 < cost < baseline
    assert "SIMULATED" in proc.stdout and "classification" in proc.stdout


def test_demo_uses_redis_and_postgres_when_configured(
    fleet_env: dict[str, str], ledger: Ledger
) -> None:
    proc = run_demo(fleet_env, 30)
    assert proc.returncode == 0, proc.stderr
    assert SUMMARY.match(proc.stdout.strip().splitlines()[-1])
    with ledger.session() as s:
        assert s.execute(select(func.count()).select_from(Job)).scalar_one() == 30


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("TIERFLEET_SIM_INVALID_RATE", "7", "setting TIERFLEET_SIM_INVALID_RATE: "),
        ("TIERFLEET_VISIBILITY_TIMEOUT_S", "5", "TIERFLEET_VISIBILITY_TIMEOUT_S (5) must exceed"),
        ("TIERFLEET_FRONTIER_MODEL", "claude-x", "add a [models.'claude-x'] table"),
        ("TIERFLEET_PRICES_FILE", "/no/such/prices.toml", "cannot read price file"),
    ],
)
def test_a_bad_setting_stops_the_demo_before_any_job_with_exit_2(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, words: str
) -> None:
    for key in ("DATABASE_URL", "REDIS_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(name, value)
    result = runner.invoke(app, ["demo", "--jobs", "3"])
    assert result.exit_code == 2
    assert words in result.output


def test_reconcile_re_drives_a_job_whose_message_was_lost(
    settings: Settings, ledger: Ledger, redis_url: str
) -> None:
    import datetime as dt

    import redis
    from sqlalchemy import update

    client = Client(settings, ledger, make_celery(settings))
    job_id = client.submit({"feature": "f", "prompt": "hello"})
    client.close()
    broker = redis.Redis.from_url(redis_url)
    broker.flushdb()  # the triage message is lost
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=settings.stale_after_s + 60)
    with ledger.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(updated_at=long_ago))

    result = runner.invoke(app, ["reconcile", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"running": 0, "queued": 1, "triaged": 0}
    assert broker.llen(settings.queue_triage) == 1  # sent again
    again = runner.invoke(app, ["reconcile"])  # at most once per deadline
    assert again.exit_code == 0 and "queued: 0 re-driven" in again.stdout
    broker.close()


def test_reconcile_names_an_unreachable_broker_with_exit_3(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:rd-Pa55word@127.0.0.1:1/0")
    result = runner.invoke(app, ["reconcile"])
    assert result.exit_code == 3, result.output
    assert "cannot reach the broker at redis://:***@127.0.0.1:1/0" in result.output
    assert "rd-Pa55word" not in result.output and "Traceback" not in result.output


def test_dead_letters_lists_what_was_given_up_on(settings: Settings, ledger: Ledger) -> None:
    from tierfleet.models import DeadLetter

    empty = runner.invoke(app, ["dead-letters"])
    assert empty.exit_code == 0 and "no dead letters" in empty.output
    with ledger.session() as s:
        for n in (1, 2):
            s.add(
                DeadLetter(
                    job_id=f"job-{n}",
                    task="tierfleet.triage",
                    queue="triage",
                    reason="errors",
                    tries=3,
                    error=f"boom {n}",
                    traceback="Traceback ...",
                )
            )
        s.commit()
    table = runner.invoke(app, ["dead-letters"], terminal_width=200)
    assert table.exit_code == 0, table.output
    assert "job-1" in table.stdout and "boom 2" in table.stdout
    newest = json.loads(runner.invoke(app, ["dead-letters", "--json", "--limit", "1"]).stdout)
    assert [(d["job_id"], d["tries"], d["traceback"]) for d in newest] == [
        ("job-2", 3, "Traceback ...")
    ]
    assert runner.invoke(app, ["dead-letters", "--limit", "0"]).exit_code == 2
