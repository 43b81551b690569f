"""Does one small-tier worker keep enough requests in flight for vLLM to batch them?

A fake vLLM server answers every request after a fixed latency (200 ms) with unlimited
parallelism. One `tierfleet worker --pool slm --concurrency 32` process runs N jobs
(queued on `tier.slm`, schema-constrained, validated, every attempt written to the
ledger). The ideal is concurrency / latency = 160 jobs/s; the figure is the measured
steady-state rate (between the 10th and the 90th percentile of finish times) over that.

    .venv/bin/python bench/slm_concurrency.py [--jobs N] [--concurrency 32] [--latency-s 0.2]

Uses BENCH_DATABASE_URL's server (default the local Postgres; a scratch database is made
and dropped) and BENCH_REDIS_URL (default redis://127.0.0.1:6379/12, flushed). Prints
last `slm_concurrency_efficiency: X`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import redis
from sqlalchemy import func, insert, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes import FakeVLLM  # noqa: E402
from tierfleet import constants as C  # noqa: E402
from tierfleet.db import Ledger, make_engine, upgrade  # noqa: E402
from tierfleet.envelope import parse_envelope  # noqa: E402
from tierfleet.models import Job  # noqa: E402
from tierfleet.settings import Settings  # noqa: E402
from tierfleet.transport import make_celery  # noqa: E402

ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")


def scratch_database() -> tuple[str, str]:
    name = f"tierfleet_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return name, f"{base}/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def enqueue_triaged_jobs(ledger: Ledger, settings: Settings, n: int) -> None:
    """N jobs already triaged to the small tier, and their messages on tier.slm."""
    rows = []
    for i in range(n):
        spec = parse_envelope(
            {
                "feature": "bench",
                "prompt": f"Review #{i}: arrived on time, works well.",
                "output_schema": "sentiment",
                "max_tokens": 64,
            }
        )
        rows.append(
            {
                "id": spec.id,
                "feature": spec.feature,
                "status": C.JobStatus.TRIAGED,
                "route": spec.route,
                "latency": spec.latency,
                "payload": spec.payload(),
                "tier": C.TIER_SLM,
                "cost_usd": 0,
                "attempt_count": 0,
            }
        )
    with ledger.session() as s:
        s.execute(insert(Job), rows)
    celery = make_celery(settings)
    with celery.producer_or_acquire() as producer:
        for row in rows:
            celery.send_task(
                C.TASK_ATTEMPT,
                args=[row["id"], C.TIER_SLM],
                queue=settings.queue_slm,
                producer=producer,
            )
    celery.close()


def finish_times(ledger: Ledger) -> list[float]:
    with ledger.session() as s:
        stamps = s.execute(select(Job.finished_at).where(Job.finished_at.is_not(None))).scalars()
        return sorted(t.timestamp() for t in stamps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-s", type=float, default=0.2)
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args()

    redis.Redis.from_url(REDIS_URL).flushdb()
    db_name, db_url = scratch_database()
    fake = FakeVLLM()
    fake.latency_s = args.latency_s
    fake.start()
    worker = None
    log = tempfile.TemporaryFile()  # noqa: SIM115  (closed in the finally below)
    try:
        upgrade(db_url)
        env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "REDIS_URL": REDIS_URL,
            "VLLM_BASE_URL": fake.base_url,
            "TIERFLEET_BACKEND": "real",
        }
        for key in ("DD_AGENT_HOST", "ANTHROPIC_API_KEY"):
            env.pop(key, None)
        settings = Settings(redis_url=REDIS_URL, database_url=db_url)  # type: ignore[arg-type]
        ledger = Ledger(make_engine(db_url))
        enqueue_triaged_jobs(ledger, settings, args.jobs)
        print(
            f"{args.jobs} jobs queued on {settings.queue_slm}; starting one worker "
            f"(concurrency {args.concurrency}) against a fake vLLM at {args.latency_s}s"
        )
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tierfleet",
                "worker",
                "--pool",
                "slm",
                "--concurrency",
                str(args.concurrency),
                "--loglevel",
                args.loglevel,
            ],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30 + 3 * args.jobs * args.latency_s / args.concurrency
        while time.monotonic() < deadline:
            with ledger.session() as s:
                done = s.execute(
                    select(func.count()).select_from(Job).where(Job.finished_at.is_not(None))
                ).scalar_one()
            if done >= args.jobs:
                break
            if worker.poll() is not None:
                log.seek(0)
                print(log.read().decode(errors="replace")[-5000:], file=sys.stderr)
                raise SystemExit("the worker exited")
            time.sleep(0.5)
        else:
            raise SystemExit(f"only {done} of {args.jobs} jobs finished in time")
        times = finish_times(ledger)
        lo, hi = times[len(times) // 10], times[len(times) * 9 // 10]
        rate = (len(times) * 8 // 10) / (hi - lo)
        ideal = args.concurrency / args.latency_s
        with ledger.session() as s:
            ok = s.execute(
                select(func.count()).select_from(Job).where(Job.status == C.JobStatus.SUCCEEDED)
            ).scalar_one()
        ledger.engine.dispose()
        print(f"succeeded: {ok} of {args.jobs}; requests seen by the fake: {len(fake.requests)}")
        print(f"ideal: {ideal:.0f} jobs/s   measured (p10-p90 of finish times): {rate:.1f} jobs/s")
        print(f"slm_concurrency_efficiency: {rate / ideal:.2f}")
        return 0
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(30)
        fake.stop()
        drop_database(db_name)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
