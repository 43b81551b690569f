"""What every `tierfleet` command shares: exit codes, the error console, settings."""

from __future__ import annotations

import enum

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from tierfleet.settings import Settings, env_names


class Exit(enum.IntEnum):
    OK = 0
    WORK_FAILED = 1
    USAGE = 2
    UNAVAILABLE = 3
    NOT_FOUND = 4


err = Console(stderr=True, soft_wrap=True)


def load_settings(**overrides: object) -> Settings:
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
