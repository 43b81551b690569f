"""`tierfleet batches`: Message Batches (half price, for jobs that can wait) on every tier
of the ladder with `batch` (the default fleet's frontier)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.table import Table

from tierfleet.cli_common import Exit, fail, load_settings, service_errors, table_console
from tierfleet.errors import ConfigurationError, PermanentError, RetryableError, ServiceUnavailable

batches_app = typer.Typer(
    help="Provider message batches: jobs with `latency: batch` on a tier with `batch = true` "
    "(the default fleet's frontier) are collected in Postgres and sent to Anthropic's "
    "Message Batches API at its batch price, each tier's in batches of its own. Beat runs "
    "the sending and the ingesting every TIERFLEET_BATCH_INTERVAL_S on a worker of each "
    "such tier.",
    invoke_without_command=True,
)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]
TierOpt = Annotated[
    str | None,
    typer.Option("--tier", help="This tier's batches alone (default: every tier with batch)."),
]


def _batch_tiers(settings: Any, tier: str | None) -> tuple[str, ...]:
    """`tier` (checked against the ladder), or every tier with `batch`."""
    if tier is not None:
        return (settings.fleet.tier(tier).name,)
    return tuple(t.name for t in settings.fleet if t.batch) or (settings.fleet.top.name,)


@contextlib.contextmanager
def _runtime(*, tiers: tuple[str, ...] | None = None, tier: str | None = None) -> Iterator[Any]:
    """A runtime with the backends of `tier`, or of every batch tier when `tiers` is None
    and none is given; `tiers=()`: no backend (the ledger alone)."""
    from tierfleet.db import check_ledger
    from workers.app import create_app
    from workers.runtime import Runtime

    settings = load_settings()
    try:
        named = _batch_tiers(settings, tier)  # an unknown --tier: a usage error naming the tiers
        wanted = named if tiers is None else tiers
        celery = create_app(settings)
        rt = Runtime.build(settings, celery, tiers=wanted)
        check_ledger(rt.ledger)
    except ConfigurationError as exc:
        raise fail(str(exc), Exit.USAGE) from None
    except ServiceUnavailable as exc:
        raise fail(str(exc), Exit.UNAVAILABLE) from None
    try:
        with service_errors(settings):
            yield rt
    finally:
        rt.close()
        celery.close()


@batches_app.callback()
def show(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 50,
    tier: TierOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """List provider batches with their tier, state and request counts, and how many
    requests wait to be sent (per tier)."""
    if ctx.invoked_subcommand is not None:
        return
    from workers.message_batches import listing, waiting_by_tier

    with _runtime(tiers=(), tier=tier) as rt:
        shown = listing(rt, limit=limit, tier=tier)
        per_tier = waiting_by_tier(rt)
    if as_json:
        print(json.dumps(shown))
        return
    out = table_console()
    table = Table("batch", "tier", "provider id", "status", "requests", "succeeded", "errored",
                  "expired", "canceled", "ingested", "created")  # fmt: skip
    for b in shown["batches"]:
        table.add_row(
            b["id"], b["tier"], b["provider_batch_id"] or "-", b["status"], str(b["requests"]),
            str(b["succeeded"]), str(b["errored"]), str(b["expired"]), str(b["canceled"]),
            str(b["ingested"]), (b["created_at"] or "")[:19],
        )  # fmt: skip
    out.print(table)
    detail = ", ".join(f"{t} {n}" for t, n in sorted(per_tier.items()) if tier in (None, t))
    out.print(f"waiting to be sent: {shown['waiting']}" + (f" ({detail})" if detail else ""))


@batches_app.command("run")
def run_now(
    force: Annotated[
        bool, typer.Option("--force", help="Send whatever waits, due or not.")
    ] = False,
    tier: TierOpt = None,
    as_json: JsonFlag = False,
) -> None:
    """One pass of what beat runs, for every tier with batch (or --tier): send due
    requests, poll, ingest ended batches.

    Safe to run beside the fleet, and to run again after a crash."""
    from workers.message_batches import Report, require_backend, run
    from workers.tasks import send_next

    with _runtime(tier=tier) as rt:
        names = _batch_tiers(rt.settings, tier)
        try:
            for name in names:
                require_backend(rt, name)
        except ConfigurationError as exc:
            raise fail(str(exc), Exit.USAGE) from None
        report = Report()
        for name in names:
            one = run(rt, send_next, tier=name, force=force)
            report.submitted += one.submitted
            report.recovered += one.recovered
            report.ingested |= one.ingested
            report.polled += one.polled
    if as_json:
        print(json.dumps(report.as_dict()))
        return
    print(f"submitted: {len(report.submitted)} batches; polled: {report.polled}; "
          f"ingested: {sum(report.ingested.values())} results; "
          f"recovered: {len(report.recovered)}")  # fmt: skip


@batches_app.command("cancel")
def cancel(
    batch: Annotated[str, typer.Argument(help="The batch: our id or the provider's.")],
    as_json: JsonFlag = False,
) -> None:
    """Ask the provider to cancel a batch.

    Requests it had not run come back `canceled` and are sent once more in a later
    batch; then their jobs fail with the reason."""
    from workers.message_batches import cancel as cancel_batch

    with _runtime() as rt:
        try:
            state = cancel_batch(rt, batch)
        except ConfigurationError as exc:
            raise fail(str(exc), Exit.USAGE) from None
        except PermanentError as exc:
            raise fail(str(exc), Exit.NOT_FOUND) from None
        except RetryableError as exc:
            raise fail(str(exc), Exit.UNAVAILABLE) from None
    if as_json:
        print(json.dumps({"id": state.id, "status": state.status, "counts": dict(state.counts)}))
        return
    print(f"{state.id}: {state.status}")
