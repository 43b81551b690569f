"""The `tierfleet` command line.

Exit codes (`tierfleet.cli_common.Exit`): 0 success; 1 the work ran but some of it
failed; 2 bad usage, input or configuration; 3 a service (Redis, Postgres) did not
answer; 4 not found. Batch commands live in `tierfleet.cli_batch`.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console

from tierfleet import (
    cli_api,
    cli_batch,
    cli_batches,
    cli_budgets,
    cli_fleet,
    cli_ops,
    cli_triage,
)
from tierfleet.cli_common import (
    Exit,
    FleetFile,
    LogLevel,
    err,
    fail,
    load_settings,
    open_ledger,
    service_errors,
)
from tierfleet.errors import ConfigurationError, TierfleetError

app = typer.Typer(
    help="tierfleet: run LLM jobs on the cheapest model tier that passes validation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="The ledger database.", no_args_is_help=True)
job_app = typer.Typer(help="Look at single jobs.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(job_app, name="job")
app.add_typer(cli_fleet.fleet_app, name="fleet")
app.add_typer(cli_triage.triage_app, name="triage")
app.add_typer(cli_budgets.budgets_app, name="budgets")
app.add_typer(cli_batches.batches_app, name="batches")
app.add_typer(cli_api.tokens_app, name="tokens")


@app.command()
def demo(
    jobs: Annotated[
        int, typer.Option(min=1, envvar="TIERFLEET_DEMO_JOBS", help="How many example jobs to run.")
    ] = 200,
    concurrency: Annotated[
        int, typer.Option(min=1, envvar="TIERFLEET_DEMO_CONCURRENCY", help="Worker threads.")
    ] = 16,
    fleet: FleetFile = None,
) -> None:
    """Run the example batch through the whole fleet in this process, and report.

    With nothing configured it uses SQLite, an in-process broker and simulated models;
    with REDIS_URL and DATABASE_URL set it uses them. The last line is the summary."""
    from tierfleet.demo import run_demo
    from tierfleet.logs import setup_logging

    settings = load_settings(fleet)
    setup_logging("WARNING")
    try:
        console = Console()
        if not console.is_terminal:
            console = Console(width=120)
        with service_errors(settings):
            row = run_demo(settings, jobs=jobs, concurrency=concurrency, console=console)
    except ConfigurationError as exc:
        raise fail(str(exc), Exit.USAGE) from None
    except TierfleetError as exc:
        raise fail(str(exc), Exit.WORK_FAILED) from None
    print(row.summary_line())


@app.command()
def worker(
    pool: Annotated[
        str,
        typer.Option(
            envvar="TIERFLEET_POOL",
            help="Which queues: triage, a tier of the ladder (slm or frontier by default), or all.",
        ),
    ] = "all",
    concurrency: Annotated[
        int | None,
        typer.Option(
            min=1,
            envvar="TIERFLEET_WORKER_CONCURRENCY",
            help="Tasks in flight (default: CPU count for triage, the tier's concurrency "
            "for a tier: TIERFLEET_SLM_CONCURRENCY / TIERFLEET_FRONTIER_CONCURRENCY by default).",
        ),
    ] = None,
    loglevel: LogLevel = "INFO",
    beat: Annotated[
        bool,
        typer.Option(
            "--beat",
            envvar="TIERFLEET_BEAT",
            help="Also run beat, the reconciler's clock, in this process (once per fleet).",
        ),
    ] = False,
    fleet: FleetFile = None,
) -> None:
    """Run a Celery worker for one pool (needs REDIS_URL and DATABASE_URL; a tier's pool
    its backend's URL or key, e.g. VLLM_BASE_URL for slm and ANTHROPIC_API_KEY for
    frontier by default, unless TIERFLEET_BACKEND=sim)."""
    from tierfleet.db import check_ledger
    from tierfleet.errors import ServiceUnavailable
    from tierfleet.logs import setup_logging
    from workers.app import create_app, plan_pool, pools
    from workers.runtime import Runtime, WorkerSpec, install

    settings = load_settings(fleet)
    if pool not in pools(settings):
        names = ", ".join(pools(settings))
        hint = "" if settings.fleet_file else " (another ladder's tiers: --fleet FILE)"
        raise fail(f"--pool must be one of {names}, not {pool!r}{hint}", Exit.USAGE)
    setup_logging(loglevel)
    plan = plan_pool(settings, pool, concurrency)
    try:
        celery = create_app(settings)
        spec = WorkerSpec(settings, celery, tiers=plan.tiers, db_pool_size=plan.concurrency + 2)
        built = Runtime.build(settings, celery, tiers=spec.tiers, db_pool_size=spec.db_pool_size)
        check_ledger(built.ledger)  # fail fast on bad config, before taking any message
    except ConfigurationError as exc:
        raise fail(str(exc), Exit.USAGE) from None
    except ServiceUnavailable as exc:
        raise fail(str(exc), Exit.UNAVAILABLE) from None
    if plan.celery_pool == "prefork":
        built.close()  # each child builds its own after the fork
        install(spec)
    else:
        install(spec, built)
    celery.worker_main(
        [
            "worker",
            "--queues",
            ",".join(plan.queues),
            "--pool",
            plan.celery_pool,
            "--concurrency",
            str(plan.concurrency),
            "--loglevel",
            loglevel,
            "--hostname",
            f"{pool}@%h",
            "--without-gossip",
            "--without-mingle",
            *(["--beat", "--schedule", cli_ops.beat_schedule_path()] if beat else []),
        ]
    )


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Create or migrate the ledger schema (DATABASE_URL) with Alembic."""
    from sqlalchemy.exc import OperationalError

    from tierfleet.db import upgrade
    from tierfleet.settings import redact_url

    settings = load_settings()
    url = settings.database_url_value()
    if url is None:
        raise fail("DATABASE_URL is not set", Exit.USAGE)
    try:
        upgrade(url, revision)
    except OperationalError as exc:
        raise fail(f"cannot reach {redact_url(url)}: {exc.orig}", Exit.UNAVAILABLE) from None
    err.print(f"ledger at {redact_url(url)} is at revision {revision}")


@job_app.command("get")
def job_get(job_id: str) -> None:
    """Print a job's status, tier, result, attempts and cost, as JSON."""
    from tierfleet.store import get_job

    with open_ledger(load_settings()) as ledger, ledger.session() as s:
        view = get_job(s, job_id)
    print(json.dumps(view.to_dict(), indent=2, default=str))


for _name in ("submit", "status", "results", "cancel", "retry"):
    app.command(_name)(getattr(cli_batch, _name))
app.command("serve")(cli_api.serve)
app.command("beat")(cli_ops.beat)
app.command("reconcile")(cli_ops.reconcile)
app.command("dead-letters")(cli_ops.dead_letters)
app.command("depth")(cli_ops.depth)
app.command("scale")(cli_ops.scale)
app.command("report")(cli_ops.report)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
