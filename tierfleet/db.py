"""Engine, sessions and migrations for the ledger."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from tierfleet.errors import ConfigurationError, LedgerNotMigrated, ServiceUnavailable
from tierfleet.resources import migrations_dir
from tierfleet.settings import Settings, redact_url


def utc(when: dt.datetime) -> dt.datetime:
    """A timestamp read back from the ledger, timezone-aware: SQLite hands back naive UTC."""
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def ledger_unavailable(exc: BaseException) -> bool:
    """The database did not answer (refused, dropped, timed out): wait and try again. Any
    other database error is a bug or bad data, and trying again will not help."""
    return isinstance(exc, DBAPIError) and (
        exc.connection_invalidated or isinstance(exc, OperationalError)
    )


# SQLSTATEs of a statement that meets a schema older than the code: no such table, column
_NOT_MIGRATED = frozenset({"42P01", "42703"})


def not_migrated(exc: BaseException) -> bool:
    """Did `exc` come from a ledger that was never migrated, or not to this version?"""
    return any(
        getattr(e, "sqlstate", None) in _NOT_MIGRATED for e in (exc, getattr(exc, "orig", None))
    )


def not_migrated_error(url: str | None) -> LedgerNotMigrated:
    """The one-line error for a ledger `not_migrated` found (the URL without its password)."""
    where = f" at {redact_url(url)}" if url else ""
    return LedgerNotMigrated(
        f"the ledger{where} has no tierfleet tables, or older ones: run `tierfleet db "
        "upgrade` with the same DATABASE_URL"
    )


def make_engine(url: str, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def engine_from_settings(settings: Settings, **kwargs: Any) -> Engine:
    url = settings.database_url_value()
    if url is None:
        raise ConfigurationError(
            "DATABASE_URL is not set; e.g. postgresql://postgres@127.0.0.1:5432/tierfleet"
        )
    # A URL that does not parse is never quoted back, not even redacted: where parsing
    # failed, nothing says which part of it is the password.
    try:
        return make_engine(url, **kwargs)
    except (NoSuchModuleError, ImportError) as exc:
        raise ConfigurationError(f"DATABASE_URL names a database without a driver: {exc}") from None
    except (ArgumentError, ValueError):
        raise ConfigurationError(
            "DATABASE_URL is not a database URL; e.g. postgresql://user:password@host:5432/db"
        ) from None


class Ledger:
    """The database handle a process shares: an engine and its session factory."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits on success, rolls back on error."""
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A Core transaction on one connection: commits on success, rolls back on error."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """A connection whose every statement commits on its own: for a write that is one
        statement, one round trip (no BEGIN, no COMMIT)."""
        with self._autocommit.connect() as conn:
            yield conn

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name


def check_ledger(ledger: Ledger) -> None:
    """Connect once and dispose: raise `ServiceUnavailable` naming the (redacted) URL."""
    try:
        with ledger.engine.connect():
            pass
    except OperationalError as exc:
        url = redact_url(ledger.engine.url.render_as_string(hide_password=False))
        raise ServiceUnavailable(f"cannot reach the ledger at {url}: {exc.orig}") from exc
    finally:
        ledger.engine.dispose()


def alembic_config(url: str) -> Any:
    from alembic.config import Config  # imported only where migrations run

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)
