"""`tierfleet batches`: the frontier's Message Batches (half price, for jobs that can wait)."""

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
    help="Provider message batches: frontier jobs with `latency: batch` are collected in "
    "Postgres and sent to Anthropic's Message Batches API at its batch price. Beat runs "
    "the sending and the ingesting every TIERFLEET_BATCH_INTERVAL_S on a frontier worker.",
    invoke_without_command=True,
)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]


@contextlib.contextmanager
def _runtime(*, frontier: bool) -> Iterator[Any]:
    from tierfleet.db import check_ledger
    from workers.app import create_app
    from workers.runtime import Runtime

    settings = load_settings()
    try:
        celery = create_app(settings)
        rt = Runtime.build(settings, celery, tiers=("frontier",) if frontier else ())
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
    as_json: JsonFlag = False,
) -> None:
    """List provider batches with their state and request counts, and how many requests
    wait to be sent."""
    if ctx.invoked_subcommand is not None:
        return
    from workers.message_batches import listing

    with _runtime(frontier=False) as rt:
        shown = listing(rt, limit=limit)
    if as_json:
        print(json.dumps(shown))
        return
    out = table_console()
    table = Table("batch", "provider id", "status", "requests", "succeeded", "errored",
                  "expired", "canceled", "ingested", "created")  # fmt: skip
    for b in shown["batches"]:
        table.add_row(
            b["id"], b["provider_batch_id"] or "-", b["status"], str(b["requests"]),
            str(b["succeeded"]), str(b["errored"]), str(b["expired"]), str(b["canceled"]),
            str(b["ingested"]), (b["created_at"] or "")[:19],
        )  # fmt: skip
    out.print(table)
    out.print(f"waiting to be sent: {shown['waiting']}")


@batches_app.command("run")
def run_now(
    force: Annotated[
        bool, typer.Option("--force", help="Send whatever waits, due or not.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """One pass of what beat runs: send due requests, poll, ingest ended batches.

    Safe to run beside the fleet, and to run again after a crash."""
    from workers.message_batches import require_backend, run
    from workers.tasks import send_next

    with _runtime(frontier=True) as rt:
        try:
            require_backend(rt)
        except ConfigurationError as exc:
            raise fail(str(exc), Exit.USAGE) from None
        report = run(rt, send_next, force=force)
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

    with _runtime(frontier=True) as rt:
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
