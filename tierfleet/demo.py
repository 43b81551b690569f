"""`tierfleet demo`: the whole fleet in one process, on nothing but this package.

With nothing configured: a SQLite ledger in a temporary folder, Celery's in-process
broker, worker threads, and SIMULATED model backends on a three-rung ladder: `slm`
(Llama 3 8B, standing in for vLLM) → `haiku` (claude-haiku-4-5) → the frontier model
(`sonnet`: claude-sonnet-4-6 unless TIERFLEET_FRONTIER_MODEL says otherwise). With
`--fleet FILE` the demo runs that ladder, simulated unless the environment configures
its models (a key or URL variable one of its tiers reads). With REDIS_URL and
DATABASE_URL set, the same run uses them (the workers are still threads of this
process); with VLLM_BASE_URL or ANTHROPIC_API_KEY set and no fleet file, it runs the
default two tiers on the real models.

The example batch's `route: slm` and `route: frontier` stand for the bottom and the top
rung of whichever ladder runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from celery import Celery
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from sqlalchemy import func, select

from tierfleet import constants as C
from tierfleet.db import Ledger, make_engine, upgrade
from tierfleet.demo_report import DemoResult, ladder_figures, print_report
from tierfleet.errors import ConfigurationError, TierfleetError
from tierfleet.fleet import Fleet, Tier, default_fleet
from tierfleet.models import Base, Batch, Job
from tierfleet.prices import PriceBook
from tierfleet.report import batch_report
from tierfleet.resources import examples_dir
from tierfleet.settings import Settings, redact_url
from tierfleet.transport import IN_PROCESS_BROKER, all_queues

MIDDLE_MODEL = "claude-haiku-4-5"  # the demo ladder's middle rung
_FAMILY = re.compile(r"\bclaude-(?:[\d.-]+-)?(haiku|sonnet|opus)\b")


def example_jobs(
    n: int, batch_id: str, path: Path | None = None, ladder: Sequence[str] | None = None
) -> Iterator[dict[str, Any]]:
    """`n` envelopes from the example batch, cycling through it; idempotency keys are
    scoped to the batch so that a rerun against a persistent ledger makes new jobs. On a
    `ladder` without them, `route: slm` is its bottom rung and `route: frontier` its top."""
    path = path or examples_dir() / "jobs.jsonl"
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    stands_for = {C.TIER_SLM: ladder[0], C.TIER_FRONTIER: ladder[-1]} if ladder else {}
    for i, envelope in zip(range(n), itertools.cycle(lines), strict=False):
        key = envelope.get("idempotency_key") or f"line-{i % len(lines) + 1}"
        out = {**envelope, "idempotency_key": f"{batch_id}:{i // len(lines)}:{key}"}
        route = envelope.get("route")
        if ladder and route in stands_for and route not in ladder:
            out["route"] = stands_for[route]
        yield out


# --- the ladder the demo runs ----------------------------------------------------------


def demo_ladder(settings: Settings) -> Fleet:
    """Three rungs from the default two: the small model, Claude Haiku, then the frontier
    model, named by its family (`sonnet` for claude-sonnet-4-6; `frontier` if it has none
    or is a Haiku)."""
    slm, frontier = default_fleet(settings).tiers
    family = _FAMILY.search(frontier.model)
    top = family.group(1) if family and family.group(1) != "haiku" else C.TIER_FRONTIER
    haiku = Tier(
        name="haiku",
        backend="anthropic",
        model=MIDDLE_MODEL,
        base_url=frontier.base_url,
        concurrency=frontier.concurrency,
        timeout_s=frontier.timeout_s,
        replicas_min=frontier.replicas_min,
        replicas_max=frontier.replicas_max,
    )
    return Fleet((slm, haiku, replace(frontier, name=top, queue=f"tier.{top}")))


def fleet_toml(fleet: Fleet) -> str:
    """`fleet` as a fleet file (what `load_fleet` reads back)."""
    out = []
    for tier in fleet:
        out.append("[[tier]]")
        for key, value in dataclasses.asdict(tier).items():
            if value is not None and (key != "max_attempts" or fleet.is_top(tier.name)):
                out.append(f"{key} = {json.dumps(value)}")
        out.append("")
    return "\n".join(out)


def configured(settings: Settings, tier: Tier) -> bool:
    """The environment gives `tier` a model to call: its key or its URL variable."""
    key = tier.api_key_env is not None and settings.tier_api_key(tier) is not None
    url = tier.url_env is not None and settings.tier_base_url(tier) is not None
    return key or url


def demo_settings(settings: Settings, workdir: Path) -> tuple[Settings, str]:
    """The settings the demo runs on, and where their ladder comes from: the demo's
    ladder, simulated, when neither a fleet file nor a model is configured; a fleet
    file's ladder, simulated unless the environment configures one of its models (or
    TIERFLEET_BACKEND says); else as given."""
    if settings.fleet_file is None:
        if not settings.use_sim_backends:
            return settings, "the default ladder"
        path = workdir / "demo-fleet.toml"
        path.write_text(fleet_toml(demo_ladder(settings)), encoding="utf-8")
        return _with(settings, fleet_file=path, backend="sim"), "the demo's ladder"
    where = f"the ladder of {settings.fleet_file}"
    real = [t for t in settings.fleet if t.backend != "sim"]
    if settings.backend == "auto" and not any(configured(settings, t) for t in real):
        return _with(settings, backend="sim"), where
    return settings, where


def _with(settings: Settings, **changes: object) -> Settings:
    values = {name: getattr(settings, name) for name in settings.model_fields_set}
    try:
        return Settings.from_env(**{**values, **changes})
    except ValidationError as exc:
        problems = (e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ConfigurationError(f"the demo's ladder: {'; '.join(problems)}") from None


def describe_ladder(settings: Settings, where: str) -> list[str]:
    """The ladder, a line for each rung: its model and backend, what is simulated, and
    how often the simulated model answers invalidly (the easiest kind to the hardest)."""
    from workers.backends.sim import KIND_ODDS, invalid_chance, rung_invalid_rate

    fleet = settings.fleet
    gpu = "" if any(t.backend == "vllm" for t in fleet) else "; no GPU rung: every rung is an API"
    lines = [f"{escape(where)}, cheapest first{gpu}:"]
    for i, tier in enumerate(fleet):
        line = f"  {i + 1}. {tier.name}: {escape(tier.model)}"
        if not settings.simulated(tier):
            lines.append(f"{line} ({tier.backend})")
            continue
        rate = rung_invalid_rate(
            settings.sim_invalid_rate, settings.sim_frontier_invalid_rate, i, len(fleet)
        )
        chances = [invalid_chance(rate, kind) for kind in KIND_ODDS]
        low, high = min(chances), max(chances)
        invalid = f"{low:.0%}" if high - low < 0.005 else f"{low:.0%} to {high:.0%}"
        lines.append(f"{line} ([yellow]simulated[/] {tier.backend}; {invalid} of answers invalid)")
    return lines


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


def run_demo(settings: Settings, *, jobs: int, concurrency: int, console: Console) -> DemoResult:
    from producers import Client
    from workers.app import create_app
    from workers.runtime import Runtime, WorkerSpec, install

    with tempfile.TemporaryDirectory(prefix="tierfleet-demo-") as tmp:
        settings, where = demo_settings(settings, Path(tmp))
        fleet = settings.fleet
        ledger, at = _ledger(settings, Path(tmp))
        broker = settings.redis_url_value()
        app = create_app(settings, broker_url=broker or IN_PROCESS_BROKER)
        spec = WorkerSpec(settings, app, ledger=ledger, db_pool_size=concurrency + 2)
        install(spec, Runtime.build(settings, app, ledger))  # a bad setting stops us here
        simulated = any(settings.simulated(t) for t in fleet)
        console.print(
            f"[bold]tierfleet demo[/]: ledger {at}; broker "
            f"{redact_url(broker) if broker else 'in-process'}; "
            + (
                f"[yellow]SIMULATED model backends[/] (latency ~{settings.sim_latency_s}s; "
                "invalid answers by rung and kind of job, fixed by TIERFLEET_SIM_SEED)"
                if simulated
                else "real model backends"
            )
        )
        for line in describe_ladder(settings, where):
            console.print(line)
        client = Client(settings, ledger, app)
        # A temporary ledger and an in-process broker are this run's alone: the same job
        # ids on every run, so that the router's exploration (drawn from the job id)
        # picks the same jobs.
        alone = broker is None and settings.database_url_value() is None
        batch_id = "demo" if alone else f"demo-{uuid.uuid4().hex[:12]}"
        with ledger.session() as s:
            s.add(Batch(id=batch_id, name="examples/jobs.jsonl", options={}, job_count=jobs))
        with worker_threads(app, all_queues(settings), concurrency), _progress(console) as bar:
            task = bar.add_task("submitting", total=jobs)
            for i, envelope in enumerate(example_jobs(jobs, batch_id, ladder=fleet.names), 1):
                client.submit({**envelope, "id": f"{batch_id}.{i}"}, batch_id=batch_id)
                bar.advance(task)
            bar.update(task, description="running", completed=0)
            _wait_for_batch(ledger, batch_id, jobs, lambda done: bar.update(task, completed=done))
        with ledger.session() as s:
            top = PriceBook.load(settings.prices_file)[fleet.top.model]
            rows = batch_report(s, batch_id, top, fleet.top.name)
            finished_on, climbs = ladder_figures(s, batch_id)
        ledger.engine.dispose()
    result = DemoResult(fleet.names, rows, finished_on, climbs)
    print_report(console, result, note="simulated backends" if simulated else "real backends")
    return result


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
