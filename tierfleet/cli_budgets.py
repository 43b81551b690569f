"""`tierfleet budgets`: daily spend caps for the frontier tier and per feature."""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated

import typer
from rich.table import Table

from tierfleet.cli_common import Exit, err, fail, load_settings, open_ledger, table_console

budgets_app = typer.Typer(
    help="Daily spend caps (UTC days): `frontier` for every frontier attempt, `feature:NAME` "
    "for every attempt of a feature. A reached cap makes new frontier attempts in its scope "
    "wait, not fail.",
    invoke_without_command=True,
)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]
_SCOPE = re.compile(r"^(frontier|feature:[^\s\x00-\x1f]{1,100})$")


def _scope(scope: str) -> str:
    if not _SCOPE.match(scope):
        raise fail(
            f"scope {scope!r}: use `frontier` or `feature:NAME` (NAME without spaces)",
            Exit.USAGE,
        )
    return scope


@budgets_app.callback()
def show(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the caps with today's spend and the jobs waiting on them."""
    if ctx.invoked_subcommand is not None:
        return
    from sqlalchemy import func, select

    from tierfleet.models import Budget, BudgetSpend, Job
    from workers.budgets import today

    settings = load_settings()
    with open_ledger(settings) as ledger, ledger.session() as s:
        caps = s.execute(select(Budget.scope, Budget.daily_cap_usd).order_by(Budget.scope)).all()
        spent = dict(
            s.execute(
                select(BudgetSpend.scope, BudgetSpend.spent_usd).where(BudgetSpend.day == today())
            ).all()
        )
        waiting = s.execute(select(func.count()).where(Job.hold_reason.is_not(None))).scalar_one()
    rows = [(scope, cap, Decimal(spent.get(scope, 0))) for scope, cap in caps]
    if as_json:
        records = [
            {"scope": scope, "daily_cap_usd": str(cap), "spent_today_usd": str(used),
             "reached": used >= cap}
            for scope, cap, used in rows
        ]  # fmt: skip
        print(json.dumps({"day": str(today()), "budgets": records, "jobs_waiting": waiting}))
        return
    if not rows:
        err.print("no budgets set (tierfleet budgets set frontier 50)")
        return
    table = Table("scope", "daily cap USD", f"spent {today()} USD", "reached")
    for scope, cap, used in rows:
        table.add_row(scope, f"{cap:.2f}", f"{used:.4f}", "yes" if used >= cap else "")
    table_console().print(table)
    err.print(f"{waiting:,} jobs waiting on a budget")


@budgets_app.command("set")
def set_cap(
    scope: Annotated[str, typer.Argument(help="`frontier` or `feature:NAME`.")],
    usd: Annotated[str, typer.Argument(help="The daily cap in USD (0 stops all spend).")],
) -> None:
    """Set (or raise, or lower) a daily cap; workers see it within seconds, and jobs
    waiting on a raised cap go on at their next look."""
    from sqlalchemy.dialects import postgresql, sqlite

    from tierfleet.models import Budget

    scope = _scope(scope)
    try:
        cap = Decimal(usd)
        if not math.isfinite(cap) or cap < 0:
            raise InvalidOperation
    except InvalidOperation:
        raise fail(
            f"the cap must be a number of dollars, 0 or more, not {usd!r}", Exit.USAGE
        ) from None
    settings = load_settings()
    with open_ledger(settings) as ledger, ledger.begin() as conn:
        ins = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(Budget)
        conn.execute(
            ins.values(scope=scope, daily_cap_usd=cap).on_conflict_do_update(
                index_elements=["scope"], set_={"daily_cap_usd": cap}
            )
        )
    err.print(f"budget {scope}: ${cap} a day")


@budgets_app.command("unset")
def unset_cap(scope: Annotated[str, typer.Argument(help="`frontier` or `feature:NAME`.")]) -> None:
    """Remove a cap: its scope spends without a limit again."""
    from sqlalchemy import delete

    from tierfleet.models import Budget

    scope = _scope(scope)
    settings = load_settings()
    with open_ledger(settings) as ledger, ledger.begin() as conn:
        gone = conn.execute(delete(Budget).where(Budget.scope == scope)).rowcount
    if not gone:
        raise fail(f"no budget for {scope!r}", Exit.NOT_FOUND)
    err.print(f"budget {scope}: removed")
