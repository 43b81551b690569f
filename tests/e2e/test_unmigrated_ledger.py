"""A ledger never migrated: every command that reads or writes it says so in one line,
naming `tierfleet db upgrade`, and exits 2; `Client.submit` raises `LedgerNotMigrated`.
And a broker that does not answer after the job is saved says the job is queued."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from producers import Client
from tests.conftest import PG_ADMIN_URL
from tierfleet.cli import app
from tierfleet.db import Ledger, engine_from_settings
from tierfleet.errors import LedgerNotMigrated, ServiceUnavailable
from tierfleet.models import Job
from tierfleet.settings import Settings
from tierfleet.transport import make_celery

pytestmark = pytest.mark.e2e
runner = CliRunner()
COMMANDS = {
    "submit": ["submit", "{jobs}"],
    "status": ["status", "b-1"],
    "job get": ["job", "get", "j-1"],
    "report": ["report"],
    "depth": ["depth"],
    "scale": ["scale"],
    "budgets": ["budgets"],
    "tokens list": ["tokens", "list"],
    "dead-letters": ["dead-letters"],
    "reconcile": ["reconcile"],
    "batches": ["batches"],
    "triage retrain": ["triage", "retrain"],
    "results": ["results", "b-1"],
    "cancel": ["cancel", "b-1"],
}


@pytest.fixture
def empty_database(fleet_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A database with no tables at all, as DATABASE_URL; the rest of the fleet's env."""
    name = f"tierfleet_empty_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    for key, value in {**fleet_env, "DATABASE_URL": url}.items():
        monkeypatch.setenv(key, value)
    yield url
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("command", COMMANDS.values(), ids=COMMANDS.keys())
def test_every_command_on_an_unmigrated_ledger_names_db_upgrade_in_one_line(
    empty_database: str, command: list[str], tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"feature": "f", "prompt": "hello"}\n')
    result = runner.invoke(app, [arg.format(jobs=jobs) for arg in command])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "has no tierfleet tables" in lines[0] and "tierfleet db upgrade" in lines[0]


def test_the_client_on_an_unmigrated_ledger_raises_ledger_not_migrated(
    empty_database: str,
) -> None:
    client = Client.from_env()
    try:
        with pytest.raises(LedgerNotMigrated, match="tierfleet db upgrade"):
            client.submit({"feature": "f", "prompt": "hello"})
    finally:
        client.close()


def test_a_broker_down_after_the_job_is_saved_says_it_is_queued(settings: Settings) -> None:
    down = Settings.from_env(redis_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    ledger = Ledger(engine_from_settings(settings))
    client = Client(down, ledger, make_celery(down))
    try:
        with pytest.raises(ServiceUnavailable) as info:
            client.submit({"feature": "f", "prompt": "hello", "id": "saved-1"})
        with ledger.session() as s:
            assert s.get_one(Job, "saved-1").status == "queued"
    finally:
        client.close()
    message = str(info.value)
    assert "job saved-1 is saved, queued" in message and "reconciler" in message
    assert "127.0.0.1:1" in message  # the broker it could not reach
