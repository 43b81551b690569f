"""What every `tierfleet` command shares: exit codes, the error console, settings, and
how a service that does not answer ends a command."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from tierfleet.db import Ledger, engine_from_settings, not_migrated, not_migrated_error
from tierfleet.errors import JobNotFound, ServiceUnavailable, TierfleetError
from tierfleet.settings import Settings, env_names, redact_url


class Exit(enum.IntEnum):
    OK = 0
    WORK_FAILED = 1
    USAGE = 2
    UNAVAILABLE = 3
    NOT_FOUND = 4


err = Console(stderr=True, soft_wrap=True)
LogLevel = Annotated[
    str,
    typer.Option(
        envvar="TIERFLEET_LOG_LEVEL",
        help="DEBUG (every job and task), INFO, WARNING or ERROR; README: Operations.",
    ),
]


FleetFile = Annotated[
    Path | None,
    typer.Option(
        "--fleet",
        envvar="TIERFLEET_FLEET_FILE",
        metavar="FILE",
        help="The ladder: a TOML fleet file listing the tiers, cheapest first "
        "(examples/fleets/). Default: slm on vLLM, then frontier on Anthropic.",
    ),
]


def table_console() -> Console:
    """Where a command prints its tables: a terminal's width on a terminal; piped or
    redirected, as wide as the table (no column cut to "featu…")."""
    console = Console()
    return console if console.is_terminal else Console(width=1_000)


def load_settings(fleet: Path | None = None, **overrides: object) -> Settings:
    """The settings from the environment (and `overrides`); `fleet` is the --fleet option.
    Bad settings are printed, one line each, naming the variable; exit 2."""
    if fleet is not None:
        overrides["fleet_file"] = fleet
    try:
        return Settings.from_env(**overrides)
    except ValidationError as exc:
        names = env_names()
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"])
            message = escape(e["msg"].removeprefix("Value error, "))
            where = f"setting {names.get(loc, loc)}: " if loc else ""
            err.print(f"[red]error:[/] {where}{message}")
        raise typer.Exit(Exit.USAGE) from None


def fail(message: str, code: Exit) -> typer.Exit:
    err.print(f"[red]error:[/] {escape(message)}")
    return typer.Exit(code)


@contextlib.contextmanager
def service_errors(settings: Settings) -> Iterator[None]:
    """Postgres or Redis not answering ends the command with exit 3 and one line that
    names the service (its URL without the password), not a driver's traceback; a ledger
    never migrated (or not to this version) with exit 2 and one line naming
    `tierfleet db upgrade`."""
    from kombu.exceptions import OperationalError as BrokerError
    from redis.exceptions import ConnectionError as RedisDown
    from redis.exceptions import ResponseError as RedisRefused
    from redis.exceptions import TimeoutError as RedisSlow
    from sqlalchemy.exc import OperationalError as LedgerError

    try:
        yield
    except LedgerError as exc:
        where = _at(settings.database_url_value())
        raise fail(f"cannot reach the ledger{where}: {exc.orig}", Exit.UNAVAILABLE) from None
    except (BrokerError, RedisDown, RedisSlow) as exc:
        where = _at(settings.redis_url_value())
        raise fail(f"cannot reach the broker{where}: {exc}", Exit.UNAVAILABLE) from None
    except RedisRefused as exc:
        if "DB index" not in str(exc):
            raise
        where = _at(settings.redis_url_value())
        raise fail(
            f"the broker{where} has no such database number ({exc}): a Redis server has "
            "databases 0 to 15 unless its `databases` setting says more",
            Exit.USAGE,
        ) from None
    except ServiceUnavailable as exc:
        raise fail(str(exc), Exit.UNAVAILABLE) from None
    except Exception as exc:
        if not not_migrated(exc):
            raise
        raise fail(str(not_migrated_error(settings.database_url_value())), Exit.USAGE) from None


def _at(url: str | None) -> str:
    return f" at {redact_url(url)}" if url else ""


@contextlib.contextmanager
def open_ledger(settings: Settings) -> Iterator[Ledger]:
    """The ledger for one command: a bad DATABASE_URL is exit 2, an unknown job or batch
    exit 4, a database or broker that does not answer exit 3."""
    try:
        ledger = Ledger(engine_from_settings(settings))
    except TierfleetError as exc:
        raise fail(str(exc), Exit.USAGE) from None
    try:
        with service_errors(settings):
            yield ledger
    except JobNotFound as exc:
        raise fail(str(exc), Exit.NOT_FOUND) from None
    finally:
        ledger.engine.dispose()
