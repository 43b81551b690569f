"""`tierfleet demo`: the whole fleet in one process, on nothing but this package.

With nothing configured: a SQLite ledger in a temporary folder, Celery's in-process
broker, worker threads, and SIMULATED model backends. With REDIS_URL and DATABASE_URL
set, the same run uses them (the workers are still threads of this process).
"""

from __future__ import annotations

import itertools
import json
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery import Celery
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select

from tierfleet import constants as C
from tierfleet.db import Ledger, make_engine, upgrade
from tierfleet.errors import TierfleetError
from tierfleet.models import Base, Batch, Job
from tierfleet.prices import PriceBook
from tierfleet.report import Row, batch_report, total
from tierfleet.resources import examples_dir
from tierfleet.settings import Settings, redact_url
from tierfleet.transport import IN_PROCESS_BROKER, all_queues


def example_jobs(n: int, batch_id: str, path: Path | None = None) -> Iterator[dict[str, Any]]:
    """`n` envelopes from the example batch, cycling through it; idempotency keys are
    scoped to the batch so that a rerun against a persistent ledger makes new jobs."""
    path = path or examples_dir() / "jobs.jsonl"
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    for i, envelope in zip(range(n), itertools.cycle(lines), strict=False):
        key = envelope.get("idempotency_key") or f"line-{i % len(lines) + 1}"
        yield {**envelope, "idempotency_key": f"{batch_id}:{i // len(lines)}:{key}"}


@contextmanager
def worker_threads(app: Celery, queues: list[str], concurrency: int) -> Iterator[None]:
    """A real Celery worker consuming `queues`, on a thread pool inside this process."""
    from celery.worker import WorkController, state

    worker = WorkController(
        app=app,
        pool="threads",
        concurrency=concurrency,
        queues=queues,
        loglevel="WARNING",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        hostname=f"demo-{uuid.uuid4().hex[:8]}@localhost",
    )
    thread = threading.Thread(target=worker.start, daemon=True, name="tierfleet-worker")
    thread.start()
    try:
        yield
    finally:
        state.should_terminate = 0
        thread.join(30)
        state.should_terminate = None


def _ledger(settings: Settings, workdir: Path) -> tuple[Ledger, str]:
    url = settings.database_url_value()
    if url is None:
        url = f"sqlite:///{workdir / 'ledger.db'}"
        engine = make_engine(url)
        Base.metadata.create_all(engine)
        return Ledger(engine), "SQLite (temporary)"
    upgrade(url)
    return Ledger(make_engine(url)), redact_url(url)


def run_demo(settings: Settings, *, jobs: int, concurrency: int, console: Console) -> Row:
    from producers import Client
    from workers.app import create_app
    from workers.runtime import Runtime, WorkerSpec, install

    with tempfile.TemporaryDirectory(prefix="tierfleet-demo-") as tmp:
        ledger, where = _ledger(settings, Path(tmp))
        broker = settings.redis_url_value()
        app = create_app(settings, broker_url=broker or IN_PROCESS_BROKER)
        spec = WorkerSpec(settings, app, ledger=ledger, db_pool_size=concurrency + 2)
        install(spec, Runtime.build(settings, app, ledger))  # a bad setting stops us here
        console.print(
            f"[bold]tierfleet demo[/]: ledger {where}; broker "
            f"{redact_url(broker) if broker else 'in-process'}; "
            f"[yellow]SIMULATED model backends[/] (latency ~{settings.sim_latency_s}s, "
            f"{settings.sim_invalid_rate:.0%} of small-model answers invalid)"
        )
        client = Client(settings, ledger, app)
        batch_id = f"demo-{uuid.uuid4().hex[:12]}"
        with ledger.session() as s:
            s.add(Batch(id=batch_id, name="examples/jobs.jsonl", options={}, job_count=jobs))
        with worker_threads(app, all_queues(settings), concurrency), _progress(console) as bar:
            task = bar.add_task("submitting", total=jobs)
            for envelope in example_jobs(jobs, batch_id):
                client.submit(envelope, batch_id=batch_id)
                bar.advance(task)
            bar.update(task, description="running", completed=0)
            _wait_for_batch(ledger, batch_id, jobs, lambda done: bar.update(task, completed=done))
        with ledger.session() as s:
            frontier = PriceBook.load(settings.prices_file)[settings.frontier_model]
            rows = batch_report(s, batch_id, frontier, C.TIER_FRONTIER)
        ledger.engine.dispose()
    _print_table(console, rows)
    return total(rows)


@contextmanager
def _progress(console: Console) -> Iterator[Progress]:
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        yield bar


class DemoStalled(TierfleetError):
    """No job of the demo batch finished for a long while."""


def _wait_for_batch(
    ledger: Ledger, batch_id: str, expected: int, report: Any, stall_s: float = 60.0
) -> None:
    terminal = [s.value for s in C.TERMINAL_STATUSES]
    last_done, last_change = -1, time.monotonic()
    while True:
        with ledger.session() as s:
            done = s.execute(
                select(func.count())
                .select_from(Job)
                .where(Job.batch_id == batch_id, Job.status.in_(terminal))
            ).scalar_one()
        report(done)
        if done >= expected:
            return
        if done != last_done:
            last_done, last_change = done, time.monotonic()
        elif time.monotonic() - last_change > stall_s:
            raise DemoStalled(
                f"no job finished for {stall_s:.0f}s; {expected - done} of {expected} unfinished"
            )
        time.sleep(0.1)


def _print_table(console: Console, rows: dict[str, Row]) -> None:
    table = Table(title="Routing and escalations by kind of job (simulated backends)")
    for name in (
        "kind",
        "jobs",
        "→ slm",
        "→ frontier",
        "escalated",
        "succeeded",
        "failed",
        "cost $",
        "all-frontier $",
        "saved",
    ):
        table.add_column(name, justify="left" if name == "kind" else "right")
    for kind, row in [*rows.items(), ("all", total(rows))]:
        table.add_row(
            kind,
            str(row.jobs),
            str(row.first_tier.get(C.TIER_SLM, 0)),
            str(row.first_tier.get(C.TIER_FRONTIER, 0)),
            str(row.escalated),
            str(row.succeeded),
            str(row.failed),
            f"{row.cost_usd:.4f}",
            f"{row.baseline_usd:.4f}",
            f"{row.savings_pct:.0f}%",
            end_section=kind == list(rows)[-1],
        )
    console.print(table)
