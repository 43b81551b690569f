"""`tierfleet submit | status | results | cancel | retry`: batches from the command line.

Every command takes `--json` and then prints one JSON document (or, for `results`, JSON
lines) on stdout; messages go to stderr. Exit codes are `tierfleet.cli_common.Exit`.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from tierfleet.cli_common import Exit, err, fail, load_settings, open_ledger, table_console
from tierfleet.db import Ledger
from tierfleet.errors import InvalidEnvelope, TierfleetError

SHOWN_ERRORS = 20
_BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,39}")  # + "." + line fits a job id

JsonFlag = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]


def _dump(data: Any) -> None:
    print(json.dumps(data, default=str))


def _progress(console: Console) -> Progress:
    """Bytes of input read, with rate and ETA (hidden when stderr is not a terminal)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def submit(
    file: Annotated[
        str, typer.Argument(help="JSONL of job envelopes (.jsonl.gz read directly; - for stdin).")
    ],
    feature: Annotated[
        str | None,
        typer.Option(envvar="TIERFLEET_BATCH_FEATURE", help="Feature for lines without one."),
    ] = None,
    route: Annotated[
        str | None,
        typer.Option(
            envvar="TIERFLEET_BATCH_ROUTE", help="Route for lines without one: auto, slm, frontier."
        ),
    ] = None,
    latency: Annotated[
        str,
        typer.Option(
            envvar="TIERFLEET_BATCH_LATENCY",
            help="Latency class for lines without one: batch or interactive.",
        ),
    ] = "batch",
    spend_cap_usd: Annotated[
        str | None,
        typer.Option(
            envvar="TIERFLEET_BATCH_SPEND_CAP_USD",
            help="Spend cap for the batch, USD: once its calls have cost this much, no new call "
            "starts and its unstarted jobs end cancelled.",
        ),
    ] = None,
    batch_id: Annotated[
        str | None,
        typer.Option(
            help="Batch id (default: derived from the input's content and these options)."
        ),
    ] = None,
    skip_invalid: Annotated[
        bool,
        typer.Option(
            "--skip-invalid", help="Submit the valid lines; write the rejects to --rejects."
        ),
    ] = False,
    rejects: Annotated[
        Path | None,
        typer.Option(
            help="Where --skip-invalid writes rejected lines (default FILE.rejects.jsonl)."
        ),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the batch to the end with a live view.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Validate a JSONL file of jobs, then submit it as one batch.

    Nothing is written unless every line is valid (or --skip-invalid). Rerunning the same
    file, or rerunning after Ctrl-C or a crash, submits exactly what is missing."""
    from producers import bulk
    from producers.jsonl import open_input
    from tierfleet.transport import make_celery

    settings = load_settings()
    try:
        cap = Decimal(spend_cap_usd) if spend_cap_usd is not None else None
    except InvalidOperation:
        cap = Decimal("NaN")
    if cap is not None and not (cap.is_finite() and cap >= 0):
        raise fail(
            f"--spend-cap-usd must be a number of dollars, 0 or more, not {spend_cap_usd!r}",
            Exit.USAGE,
        )
    _check_batch_options(feature, route, latency, batch_id, settings.fleet.names)
    options = bulk.BatchOptions(
        feature=feature,
        route=route,
        latency=latency,
        spend_cap_usd=cap,
        batch_id=batch_id,
        skip_invalid=skip_invalid,
        tiers=settings.fleet.names,
    )
    with contextlib.ExitStack() as stack:
        try:
            source = stack.enter_context(open_input(file))
        except TierfleetError as exc:
            raise fail(str(exc), Exit.USAGE) from None
        rejects_path = rejects or Path(f"{'stdin' if file == '-' else file}.rejects.jsonl")
        rejected = stack.enter_context(_rejects_file(rejects_path if skip_invalid else None))
        ledger = stack.enter_context(open_ledger(settings))
        celery = make_celery(settings)
        stack.callback(celery.close)
        console = Console(stderr=True)
        with _progress(console) as bar:
            total = None if source.gzip else source.size()
            task = bar.add_task("submitting", total=total)
            try:
                report = bulk.submit(
                    source, options, ledger, celery, settings.queue_triage,
                    on_reject=rejected, progress=lambda n: bar.advance(task, n),
                )  # fmt: skip
            except InvalidEnvelope as exc:
                raise fail(str(exc), Exit.USAGE) from None
        summary = report.summary()
        if not report.submitted:
            _print_errors(report, file)
            if as_json:
                _dump({**summary, "errors": [e.record() for e in report.errors[:1000]]})
            raise typer.Exit(Exit.USAGE)
        if report.error_count:
            err.print(f"{report.error_count:,} invalid lines skipped; reasons in {rejects_path}")
        if not as_json:
            resumed = report.resumed_from_line
            err.print(
                f"batch [bold]{report.batch_id}[/]: {report.written:,} jobs submitted, "
                f"{report.existing:,} already there, {report.error_count:,} rejected"
                + (f" (resumed after line {resumed:,})" if resumed else "")
            )
        failed = False
        if wait:
            final = _follow(ledger, report.batch_id, quiet=as_json)
            summary["status"] = final.to_dict()
            # not all the work was done: jobs failed, or were cancelled (by hand, or by
            # the batch's spend cap)
            failed = any(final.by_status.get(s) for s in ("failed", "cancelled"))
        if as_json:
            _dump(summary)
        elif not wait:
            print(report.batch_id)
        if failed:
            raise typer.Exit(Exit.WORK_FAILED)


def _check_batch_options(
    feature: str | None,
    route: str | None,
    latency: str,
    batch_id: str | None,
    tiers: tuple[str, ...],
) -> None:
    """Batch options are envelope fields for the lines that lack them: checked the same
    way, once, before the file is opened."""
    from tierfleet.envelope import parse_envelope

    template: dict[str, Any] = {"feature": feature or "f", "prompt": "x", "latency": latency}
    if route:
        template["route"] = route
    try:
        parse_envelope(template, tiers=tiers)
    except InvalidEnvelope as exc:
        raise fail(f"--{exc.field}: {exc.reason}", Exit.USAGE) from None
    if batch_id is not None and not _BATCH_ID.fullmatch(batch_id):
        raise fail(
            f"--batch-id must be 1-40 letters, digits, '.', '_', ':' or '-', not {batch_id!r}",
            Exit.USAGE,
        )


@contextlib.contextmanager
def _rejects_file(path: Path | None) -> Iterator[Callable[[Any], None]]:
    """A callback that appends a rejected line's reason to `path` (or drops it)."""
    if path is None:
        yield lambda error: None
        return
    with path.open("w", encoding="utf-8") as out:

        def write(error: Any) -> None:
            out.write(json.dumps(error.record()) + "\n")

        yield write


def _print_errors(report: Any, file: str) -> None:
    for e in report.errors[:SHOWN_ERRORS]:
        err.print(f"[red]error:[/] {file}: {e}", markup=True, highlight=False)
    more = report.error_count - min(SHOWN_ERRORS, len(report.errors))
    if more > 0:
        err.print(f"... and {more:,} more")
    err.print(
        f"{report.error_count:,} of {report.lines:,} lines are invalid; nothing was submitted "
        "(fix them, or --skip-invalid to submit the rest)"
    )


def _status_table(s: Any) -> Table:
    table = Table(
        title=f"batch {s.batch_id}" + (" (cancelled)" if s.cancelled else ""), show_header=False
    )
    table.add_column("")
    table.add_column("", justify="right")
    for name, count in sorted(s.by_status.items()):
        table.add_row(name, f"{count:,}")
    table.add_row("jobs", f"{s.jobs:,}", end_section=True)
    for tier, count in sorted(s.by_tier.items()):
        table.add_row(f"tier {tier}", f"{count:,}")
    table.add_row("escalated", f"{s.escalated:,} ({s.escalation_rate:.1%})", end_section=True)
    cap = f" of {s.spend_cap_usd:.4f} cap" if s.spend_cap_usd is not None else ""
    table.add_row("spend USD", f"{s.spend_usd:.4f}{cap}")
    table.add_row("throughput", f"{s.jobs_per_s:,.1f} jobs/s")
    eta = "—" if s.eta_s is None else f"{s.eta_s:,.0f} s"
    table.add_row("ETA", eta)
    return table


def _follow(ledger: Ledger, batch_id: str, *, quiet: bool) -> Any:
    from producers.batches import status as batch_status

    current = batch_status(ledger, batch_id)
    live = None
    if not quiet:
        live = Live(_status_table(current), console=Console(stderr=True), refresh_per_second=2)
    with live or contextlib.nullcontext():
        while not current.finished:
            time.sleep(1.0)
            current = batch_status(ledger, batch_id)
            if live is not None:
                live.update(_status_table(current))
    return current


def status(
    batch_id: str,
    watch: Annotated[bool, typer.Option("--watch", help="Follow the batch until it ends.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Counts by status and tier, escalation rate, spend, throughput and ETA of a batch."""
    from producers.batches import status as batch_status

    with open_ledger(load_settings()) as ledger:
        current = (
            _follow(ledger, batch_id, quiet=as_json) if watch else batch_status(ledger, batch_id)
        )
    if as_json:
        _dump(current.to_dict())
    elif not watch:
        table_console().print(_status_table(current))


def results(
    batch_id: str,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write to this file instead of stdout.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """The batch's jobs as JSON lines, in input order: line, id, status, tier, result,
    cost, attempts, error. (Always JSON; --json is accepted for uniformity.)"""
    from producers.batches import results as batch_results

    with open_ledger(load_settings()) as ledger, _open_out(output) as out:
        n = 0
        for record in batch_results(ledger, batch_id):
            out.write(json.dumps(record, default=str) + "\n")
            n += 1
    if output is not None:
        err.print(f"{n:,} results written to {output}")


@contextlib.contextmanager
def _open_out(path: Path | None) -> Iterator[IO[str]]:
    if path is None:
        yield sys.stdout
        return
    with path.open("w", encoding="utf-8") as f:
        yield f


def cancel(batch_id: str, as_json: JsonFlag = False) -> None:
    """Cancel the batch's unstarted jobs (queued, triaged); running ones finish."""
    from producers.batches import cancel as batch_cancel

    with open_ledger(load_settings()) as ledger:
        n = batch_cancel(ledger, batch_id)
    if as_json:
        _dump({"batch_id": batch_id, "cancelled": n})
    else:
        err.print(f"batch {batch_id}: {n:,} unstarted jobs cancelled; running ones will finish")


def retry(
    batch_id: str,
    failed: Annotated[
        bool, typer.Option("--failed", help="Retry the batch's failed jobs.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Send a batch's failed jobs through the fleet again."""
    from producers.batches import retry_failed
    from tierfleet.transport import make_celery

    if not failed:
        raise fail("say what to retry: --failed", Exit.USAGE)
    settings = load_settings()
    with open_ledger(settings) as ledger:
        celery = make_celery(settings)
        try:
            n = retry_failed(ledger, celery, settings.queue_triage, batch_id)
        finally:
            celery.close()
    if as_json:
        _dump({"batch_id": batch_id, "retried": n})
    else:
        err.print(f"batch {batch_id}: {n:,} failed jobs sent again")
