"""`tierfleet serve` (the HTTP API) and `tierfleet tokens` (its bearer tokens)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Column, Table

from tierfleet.cli_common import (
    Exit,
    LogLevel,
    err,
    fail,
    load_settings,
    open_ledger,
    table_console,
)

tokens_app = typer.Typer(
    help="Bearer tokens of the HTTP API (tierfleet serve), each mapped to a team and a "
    "default feature. Only a token's SHA-256 is stored.",
    no_args_is_help=True,
)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]


@tokens_app.command("create")
def tokens_create(
    team: Annotated[
        str,
        typer.Option(
            help="The team whose jobs the token submits and sees: 1 to 32 lowercase letters, "
            "digits or _ . - (no ':' or '/')."
        ),
    ],
    feature: Annotated[
        str | None,
        typer.Option(
            help="The feature of jobs submitted without one. A team's features are booked "
            "(budgets, reports) as TEAM/FEATURE."
        ),
    ] = None,
    rate_limit: Annotated[
        str | None,
        typer.Option(
            help="Requests this token may make, e.g. '100/second' (default: "
            "TIERFLEET_API_RATE_LIMIT)."
        ),
    ] = None,
) -> None:
    """Make a token. It is printed once, alone on the last line: keep it now."""
    from producers.api import tokens
    from producers.teams import team_feature

    with open_ledger(load_settings()) as ledger:
        try:
            info, token = tokens.create(ledger, team, feature=feature, rate_limit=rate_limit)
        except tokens.TokenError as exc:
            raise fail(str(exc), Exit.USAGE) from None
    default = ""
    if info.feature:
        booked = team_feature(info.team, info.feature)
        default = f", default feature {info.feature!r} (booked as {booked!r})"
    err.print(f"token {info.id} for team {info.team!r}{default}")
    print(token)


@tokens_app.command("list")
def tokens_list(as_json: JsonFlag = False) -> None:
    """List tokens (ids, teams, prefixes; never the tokens)."""
    from producers.api import tokens

    with open_ledger(load_settings()) as ledger:
        rows = tokens.list_tokens(ledger)
    if as_json:
        print(json.dumps([r.to_dict() for r in rows]))
        return
    if not rows:
        err.print("no tokens (tierfleet tokens create --team TEAM)")
        return
    table = Table("team", "feature", "prefix", "rate limit", "created", "revoked")
    table.columns.insert(0, Column("id", no_wrap=True, min_width=len(rows[0].id)))  # to copy
    for r in rows:
        table.add_row(
            r.id, r.team, r.feature or "", r.prefix + "…", r.rate_limit or "default",
            f"{r.created_at:%Y-%m-%d}", f"{r.revoked_at:%Y-%m-%d}" if r.revoked_at else "",
        )  # fmt: skip
    table_console().print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (tok_...).")],
) -> None:
    """Revoke a token: the server refuses it from its next request."""
    from producers.api import tokens

    with open_ledger(load_settings()) as ledger:
        try:
            info = tokens.revoke(ledger, token_id)
        except tokens.TokenError as exc:
            raise fail(str(exc), Exit.NOT_FOUND) from None
    err.print(f"token {info.id} of team {info.team!r} revoked")


def serve(
    host: Annotated[str, typer.Option(envvar="TIERFLEET_API_HOST", help="Address to bind.")] = (
        "127.0.0.1"
    ),
    port: Annotated[
        int, typer.Option(min=1, max=65535, envvar="TIERFLEET_API_PORT", help="Port to bind.")
    ] = 8000,
    workers: Annotated[
        int, typer.Option(min=1, envvar="TIERFLEET_API_WORKERS", help="Server processes.")
    ] = 1,
    loglevel: LogLevel = "INFO",
) -> None:
    """Run the HTTP API (needs REDIS_URL and DATABASE_URL): POST /v1/jobs, GET
    /v1/jobs/{id}, /healthz, /readyz, the OpenAPI document at /openapi.json."""
    import uvicorn

    from tierfleet.db import Ledger, check_ledger, engine_from_settings
    from tierfleet.errors import ConfigurationError, ServiceUnavailable
    from tierfleet.logs import setup_logging

    settings = load_settings()
    setup_logging(loglevel)
    try:
        if settings.redis_url_value() is None:
            raise ConfigurationError("REDIS_URL is not set; e.g. redis://127.0.0.1:6379/0")
        ledger = Ledger(engine_from_settings(settings))
        check_ledger(ledger)  # fail fast, before binding the port
        ledger.engine.dispose()
    except ConfigurationError as exc:
        raise fail(str(exc), Exit.USAGE) from None
    except ServiceUnavailable as exc:
        raise fail(str(exc), Exit.UNAVAILABLE) from None
    uvicorn.run(
        "producers.api.app:app_from_env", factory=True, host=host, port=port,
        workers=workers, log_level=loglevel.lower(), log_config=None,
    )  # fmt: skip
