"""Alembic environment for the tierfleet ledger.

The URL comes from the Alembic config (`tierfleet db upgrade` sets it) or, for plain
`alembic upgrade head`, from DATABASE_URL through the settings object.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

from tierfleet.db import make_engine
from tierfleet.models import Base
from tierfleet.settings import Settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from_env = Settings.from_env().database_url_value()
    if not from_env:
        raise SystemExit("DATABASE_URL is not set")
    return from_env


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
