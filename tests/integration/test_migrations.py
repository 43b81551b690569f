"""The Alembic head equals the models, and the migrations run both ways."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from tests.conftest import PG_ADMIN_URL
from tierfleet.db import alembic_config, make_engine, upgrade
from tierfleet.models import Base

pytestmark = pytest.mark.integration


def test_migrated_schema_equals_the_models(pg_database: str) -> None:
    engine = make_engine(pg_database)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    assert diff == []


@pytest.fixture
def scratch_database(pg_database: str) -> Iterator[str]:
    name = "tierfleet_migration_scratch"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_downgrade_to_base_and_upgrade_again(scratch_database: str) -> None:
    upgrade(scratch_database)
    command.downgrade(alembic_config(scratch_database), "base")
    engine = make_engine(scratch_database)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(scratch_database)
    assert {"batches", "jobs", "attempts"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_migrations_run_on_sqlite_too(tmp_path: Path) -> None:
    """`DATABASE_URL=sqlite:///...` (a one-machine ledger) is migrated like Postgres."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    command.downgrade(alembic_config(url), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
