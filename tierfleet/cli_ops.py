"""Commands for the people who run the fleet: beat, the reconciler, dead letters."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from tierfleet.cli_common import (
    Exit,
    LogLevel,
    err,
    fail,
    load_settings,
    open_ledger,
    service_errors,
    table_console,
)
from tierfleet.errors import ConfigurationError, ServiceUnavailable

if TYPE_CHECKING:
    import redis

    from tierfleet.settings import Settings
    from workers.depth import Depth

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]


def beat_schedule_path() -> str:
    """Beat keeps its last-run times in a file; one per process, under the temp dir."""
    return os.path.join(tempfile.gettempdir(), f"tierfleet-beat-{os.getpid()}")


def beat(
    loglevel: LogLevel = "INFO",
) -> None:
    """Run beat, the clock that sends the reconciler's runs (every
    TIERFLEET_RECONCILE_INTERVAL_S). Run exactly one per fleet (or `worker --beat` once)."""
    from tierfleet.logs import setup_logging
    from workers.app import create_app

    settings = load_settings()
    setup_logging(loglevel)
    try:
        celery = create_app(settings)
    except ConfigurationError as exc:
        raise fail(str(exc), Exit.USAGE) from None
    celery.start(["beat", "--schedule", beat_schedule_path(), "--loglevel", loglevel])


def reconcile(as_json: JsonFlag = False) -> None:
    """Re-drive stranded jobs now (one pass of what beat runs periodically): running
    jobs whose lease lapsed, and queued or triaged jobs whose message was lost."""
    from tierfleet.db import check_ledger
    from workers.app import create_app
    from workers.reconcile import reconcile as run
    from workers.runtime import Runtime
    from workers.tasks import send_attempt, send_triage

    settings = load_settings()
    try:
        celery = create_app(settings)
        rt = Runtime.build(settings, celery, tiers=())
        check_ledger(rt.ledger)
    except ConfigurationError as exc:
        raise fail(str(exc), Exit.USAGE) from None
    except ServiceUnavailable as exc:
        raise fail(str(exc), Exit.UNAVAILABLE) from None
    try:
        with service_errors(settings):
            counts = run(rt, send_triage, send_attempt)
    finally:
        rt.close()
        celery.close()
    if as_json:
        print(json.dumps(counts))
        return
    for stage in ("running", "queued", "triaged"):
        print(f"{stage}: {counts.get(stage, 0)} re-driven")


def dead_letters(
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """List dead letters: messages given up on (undecodable, unknown task, failing every
    time, or crashing their worker), with the error; `--json` adds tracebacks and bodies."""
    from sqlalchemy import select

    from tierfleet.models import DeadLetter

    settings = load_settings()
    with open_ledger(settings) as ledger, ledger.session() as s:
        rows = s.scalars(select(DeadLetter).order_by(DeadLetter.id.desc()).limit(limit)).all()
        records = [
            {
                "id": r.id,
                "created_at": r.created_at.isoformat(),
                "reason": r.reason,
                "task": r.task,
                "queue": r.queue,
                "job_id": r.job_id,
                "tries": r.tries,
                "error": r.error,
                "traceback": r.traceback,
                "body": r.body,
            }
            for r in rows
        ]
    if as_json:
        print(json.dumps(records))
        return
    if not records:
        err.print("no dead letters")
        return
    table = Table("id", "when", "reason", "task", "job", "tries", "error")
    for r in records:
        table.add_row(
            str(r["id"]), str(r["created_at"])[:19], str(r["reason"]), str(r["task"] or ""),
            str(r["job_id"] or ""), str(r["tries"]), str(r["error"])[:120],
        )  # fmt: skip
    table_console().print(table)


def _broker_client(settings: Settings) -> redis.Redis:
    import redis

    url = settings.real_redis_url()
    if url is None:
        raise fail("depth and scale read Redis: set REDIS_URL", Exit.USAGE)
    return redis.Redis.from_url(url, socket_timeout=5)


def depth(
    as_json: JsonFlag = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh every 2 s until Ctrl-C.")] = False,
) -> None:
    """Queue depth per queue (triage, every tier's, and each batch tier's provider-batch
    queue): ready messages (every priority step), delivered but not yet acknowledged, jobs
    waiting in the ledger and the oldest wait; for every vllm tier, its server's waiting
    and running requests (read from /metrics at the root of the tier's base URL)."""
    import time

    from rich.live import Live

    from workers.depth import read

    settings = load_settings()
    client = _broker_client(settings)
    with open_ledger(settings) as ledger:

        def reading() -> Depth:
            return read(settings, ledger, client)

        if as_json:
            print(json.dumps(reading().to_dict()))
            return
        if not watch:
            table_console().print(_depth_table(reading()))
            return
        with Live(_depth_table(reading()), refresh_per_second=1) as live:
            try:
                while True:
                    time.sleep(2)
                    live.update(_depth_table(reading()))
            except KeyboardInterrupt:
                pass


def _depth_table(d: Depth) -> Table:
    table = Table("queue", "pool", "ready", "unacked", "waiting jobs", "oldest wait")
    for q in d.queues:
        oldest = "—" if q.oldest_wait_s is None else f"{q.oldest_wait_s:,.0f} s"
        table.add_row(
            q.queue, q.pool, f"{q.ready:,}", f"{q.unacked:,}", f"{q.waiting_jobs:,}", oldest
        )
    lines = []
    for server in d.servers:
        if server.error is not None:
            lines.append(f"vLLM ({server.tier}): not reached ({server.error})")
        else:
            lines.append(
                f"vLLM ({server.tier}): {server.waiting or 0:,.0f} waiting, "
                f"{server.running or 0:,.0f} running"
            )
    if lines:
        table.caption = "\n".join(lines)
    return table


def scale(
    as_json: JsonFlag = False,
    keda: Annotated[
        bool,
        typer.Option(
            "--keda",
            help="Print a KEDA ScaledObject per pool (triage and every tier), its listLength "
            "from the measured throughput; reads the ledger, not Redis.",
        ),
    ] = False,
) -> None:
    """Replicas each pool (triage and every tier of the ladder) needs to drain its queues
    within TIERFLEET_SCALE_DRAIN_S, at the per-worker throughput the ledger shows (the
    tier's concurrency over its mean latency, or its timeout before any is measured),
    within each pool's min and max (a tier's replicas_min and replicas_max)."""
    from workers.depth import read
    from workers.scale import per_worker_rates, recommend

    settings = load_settings()
    if keda:
        from workers.keda import manifests

        with open_ledger(settings) as ledger:
            print(manifests(settings, per_worker_rates(settings, ledger)), end="")
        return
    client = _broker_client(settings)
    with open_ledger(settings) as ledger:
        recs = recommend(settings, ledger, read(settings, ledger, client, vllm=False))
    if as_json:
        print(json.dumps([r.to_dict() for r in recs]))
        return
    table = Table("pool", "queue", "depth", "per worker", "replicas", "limits", "basis")
    for r in recs:
        table.add_row(
            r.pool, r.queue, f"{r.depth:,}", f"{r.per_worker_jobs_per_s:,.1f} jobs/s",
            str(r.replicas), f"{r.min_replicas}-{r.max_replicas}", r.basis,
        )  # fmt: skip
    table_console().print(table)
    err.print(f"drain target {settings.scale_drain_s:,.0f} s")


def report(
    since: Annotated[str, typer.Option(help="The window: 30m, 24h, 7d, 2w.")] = "7d",
    by: Annotated[str, typer.Option(help="Group by feature, tier, model or batch.")] = "feature",
    escalation_warning: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Warn about features escalating more.")
    ] = 0.2,
    html: Annotated[
        Path | None, typer.Option(help="Also write a self-contained HTML page with charts.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """The FinOps report: spend, jobs, cost per succeeded job, escalation rate, the share
    of jobs that started on the top rung, and savings against sending everything to the
    top rung's model, per group (feature, tier, model or batch) and in all, with a warning
    for each feature whose escalation rate passes the threshold."""
    from tierfleet.errors import InvalidEnvelope
    from tierfleet.finops import build, parse_since
    from tierfleet.prices import PriceBook

    settings = load_settings()
    try:
        window = parse_since(since)
        prices = PriceBook.load(settings.prices_file)
        top = settings.fleet.top
        top_price = prices[top.model]
    except (InvalidEnvelope, ConfigurationError) as exc:
        raise fail(str(exc), Exit.USAGE) from None
    with open_ledger(settings) as ledger:
        try:
            rep = build(
                ledger, since=window, by=by, frontier=top_price,
                escalation_warning=escalation_warning, ladder=settings.fleet.names,
                batch_discounts={m: prices[m].batch_discount for m in prices.models()},
            )  # fmt: skip
        except InvalidEnvelope as exc:
            raise fail(str(exc), Exit.USAGE) from None
    if html is not None:
        from tierfleet.finops_html import render

        try:
            html.write_text(render(rep), encoding="utf-8")
        except OSError as exc:
            raise fail(f"{html}: {exc.strerror or exc}", Exit.USAGE) from None
    if as_json:
        print(json.dumps(rep.to_dict()))
        return
    saved = by in ("feature", "batch")
    table = Table(by, "spend USD", "jobs", "per succeeded job", "escalation", f"{top.name} share",
                  *(["saved USD"] if saved else []))  # fmt: skip
    for name, g in [*rep.groups.items(), ("all", rep.total)]:
        per = g.cost_per_succeeded_usd
        table.add_row(
            name, f"{g.spend_usd:,.4f}", f"{g.jobs:,}", "—" if per is None else f"{per:,.6f}",
            f"{g.escalation_rate:.1%}", f"{g.frontier_share:.1%}",
            *([f"{g.savings_usd:,.4f} ({g.savings_pct:.0f}%)"] if saved else []),
            end_section=name == list(rep.groups)[-1] if rep.groups else False,
        )  # fmt: skip
    table_console().print(table)
    t = rep.total
    err.print(
        f"{rep.since:%Y-%m-%d %H:%M} to {rep.until:%Y-%m-%d %H:%M} UTC: spent ${t.spend_usd:,.4f}, "
        f"all-{top.name} ${t.baseline_usd:,.4f}, saved ${t.savings_usd:,.4f} ({t.savings_pct:.1f}%)"
    )
    if rep.batch_attempts:
        err.print(
            f"Message Batches: {rep.batch_attempts:,} attempts cost ${rep.batch_spend_usd:,.4f} "
            f"instead of ${rep.batch_standard_usd:,.4f} one by one: saved "
            f"${rep.batch_savings_usd:,.4f}"
        )
    for warning in rep.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}")
    if html is not None:
        err.print(f"wrote {html}")
