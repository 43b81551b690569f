"""`tierfleet budgets`: daily spend caps per tier of the ladder, for the top rung, and per
feature."""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from tierfleet.cli_common import Exit, err, fail, load_settings, open_ledger, table_console

if TYPE_CHECKING:
    from tierfleet.settings import Settings

budgets_app = typer.Typer(
    help="Daily spend caps (UTC days): `tier:NAME` for every attempt on a tier of the ladder, "
    "`frontier` for every attempt on the top rung, `feature:NAME` for every attempt of a "
    "feature. A reached cap makes new attempts in its scope wait, not fail (a feature's "
    "cap does not hold a self-hosted vllm tier's).",
    invoke_without_command=True,
)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]
_SCOPE = re.compile(r"^(frontier|feature:[^\s\x00-\x1f]{1,100}|tier:[a-z][a-z0-9_]{0,31})$")
ScopeArg = Annotated[
    str | None,
    typer.Argument(
        help="`tier:NAME`, `frontier` (the top rung) or `feature:NAME`.", show_default=False
    ),
]
TierOpt = Annotated[
    str | None,
    typer.Option("--tier", help="A tier of the ladder: the same as the scope tier:NAME."),
]


def _scope(scope: str | None, tier: str | None, settings: Settings) -> str:
    if tier is not None:
        if scope is not None:
            raise fail(f"give the scope {scope!r} or --tier {tier}, not both", Exit.USAGE)
        scope = f"tier:{tier}"
    if scope is None:
        raise fail("give a scope (tier:NAME, frontier or feature:NAME) or --tier NAME", Exit.USAGE)
    if not _SCOPE.match(scope):
        raise fail(
            f"scope {scope!r}: use `tier:NAME`, `frontier` or `feature:NAME` (NAME without spaces)",
            Exit.USAGE,
        )
    name = scope.removeprefix("tier:")
    if scope.startswith("tier:") and name not in settings.fleet:
        raise fail(
            f"scope {scope!r}: no tier {name!r} in the ladder; tiers are "
            f"{', '.join(settings.fleet.names)}",
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
        err.print("no budgets set (tierfleet budgets set --tier NAME 50, or frontier 50)")
        return
    table = Table("scope", "daily cap USD", f"spent {today()} USD", "reached")
    for scope, cap, used in rows:
        table.add_row(scope, f"{cap:.2f}", f"{used:.4f}", "yes" if used >= cap else "")
    table_console().print(table)
    err.print(f"{waiting:,} jobs waiting on a budget")


@budgets_app.command("set")
def set_cap(
    args: Annotated[
        list[str],
        typer.Argument(
            help="SCOPE USD, or USD alone with --tier. SCOPE: `tier:NAME`, `frontier` (the "
            "top rung) or `feature:NAME`; USD: the daily cap (0 stops all spend).",
            show_default=False,
        ),
    ],
    tier: TierOpt = None,
) -> None:
    """Set (or raise, or lower) a daily cap; workers see it within seconds, and jobs
    waiting on a raised cap go on at their next look."""
    from sqlalchemy.dialects import postgresql, sqlite

    from tierfleet.models import Budget

    settings = load_settings()
    if len(args) not in (1, 2) or (len(args) == 1) != (tier is not None):
        raise fail("give SCOPE USD, or --tier NAME USD", Exit.USAGE)
    scope, usd = (None, args[0]) if len(args) == 1 else (args[0], args[1])
    scope = _scope(scope, tier, settings)
    try:
        cap = Decimal(usd)
        if not math.isfinite(cap) or cap < 0:
            raise InvalidOperation
    except InvalidOperation:
        raise fail(
            f"the cap must be a number of dollars, 0 or more, not {usd!r}", Exit.USAGE
        ) from None
    with open_ledger(settings) as ledger, ledger.begin() as conn:
        ins = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(Budget)
        conn.execute(
            ins.values(scope=scope, daily_cap_usd=cap).on_conflict_do_update(
                index_elements=["scope"], set_={"daily_cap_usd": cap}
            )
        )
    err.print(f"budget {scope}: ${cap} a day")


@budgets_app.command("unset")
def unset_cap(scope: ScopeArg = None, tier: TierOpt = None) -> None:
    """Remove a cap: its scope spends without a limit again."""
    from sqlalchemy import delete

    from tierfleet.models import Budget

    settings = load_settings()
    scope = _scope(scope, tier, settings)
    with open_ledger(settings) as ledger, ledger.begin() as conn:
        gone = conn.execute(delete(Budget).where(Budget.scope == scope)).rowcount
    if not gone:
        raise fail(f"no budget for {scope!r}", Exit.NOT_FOUND)
    err.print(f"budget {scope}: removed")
