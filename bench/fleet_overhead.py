"""The fleet's own overhead against bare Celery, on zero-latency simulated models.

In one run, on the real Redis and Postgres, with worker processes started here:

(a) the fleet: `tierfleet submit` of N jobs, then triage (prefork, one process a core),
    the small tier (threads) with 10% of its answers invalid and so escalated, the
    frontier (threads), and the ledger, until every job is terminal;
(b) the baseline: N two-hop no-op Celery chains (`bench/_bare.py`) on the same broker
    and worker settings: hop one on a prefork pool, hop two on a thread pool.

    .venv/bin/python bench/fleet_overhead.py [--jobs 5000]

Prints jobs/s for both, the SQL statements per job by kind (counted in every worker
process) and the Redis commands per job (the server's `INFO commandstats`), and last
`fleet_vs_bare_celery: X`. Uses BENCH_DATABASE_URL's server (a scratch database, made
and dropped) and BENCH_REDIS_URL (default redis://127.0.0.1:6379/12, flushed).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
CORES = os.cpu_count() or 2


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args, env=env, cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def _wait(done: Callable[[], bool], what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def _commands(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def _jobs_file(path: Path, n: int, prefix: str) -> None:
    with path.open("w") as f:
        for i in range(n):
            envelope = {"feature": "reviews", "prompt": f"{prefix} review {i}: fine",
                        "output_schema": "sentiment", "max_tokens": 64}  # fmt: skip
            f.write(json.dumps(envelope) + "\n")


def fleet(n: int, db_url: str, tmp: Path) -> tuple[float, dict[str, float], float]:
    counts_dir = tmp / "sql"
    counts_dir.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TIERFLEET_", "DD_"))},
        "DATABASE_URL": db_url, "REDIS_URL": REDIS_URL, "TIERFLEET_BACKEND": "sim",
        "TIERFLEET_LOG_LEVEL": os.environ.get("TIERFLEET_LOG_LEVEL", "INFO"),
        "TIERFLEET_SIM_LATENCY_S": "0", "TIERFLEET_SIM_INVALID_RATE": "0.1",
        "TIERFLEET_SIM_FRONTIER_INVALID_RATE": "0", "TIERFLEET_TRIAGE_EXPLORE": "0",
        "PYTHONPATH": str(ROOT / "bench" / "_probe"), "BENCH_SQL_COUNTS": str(counts_dir),
    }  # fmt: skip
    tf = [sys.executable, "-m", "tierfleet"]
    log = tmp / "fleet.log"
    procs = [
        _start([*tf, "worker", "--pool", "triage", "--concurrency", str(CORES)], env, log),
        _start([*tf, "worker", "--pool", "slm", "--concurrency", "8"], env, log),
        _start([*tf, "worker", "--pool", "frontier", "--concurrency", "4"], env, log),
    ]
    db = psycopg.connect(db_url.replace("+psycopg", ""), autocommit=True)
    r = redis.Redis.from_url(REDIS_URL)

    def terminal() -> int:
        row = db.execute(
            "SELECT count(*) FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled')"
        ).fetchone()
        return int(row[0]) if row else 0

    def submit(path: Path) -> None:
        subprocess.run([*tf, "submit", str(path), "--json"], env={**env, "PYTHONPATH": ""},
                       cwd=ROOT, check=True, capture_output=True)  # fmt: skip

    try:
        warm = tmp / "warm.jsonl"
        _jobs_file(warm, 200, "warm-up")
        submit(warm)
        _wait(lambda: terminal() >= 200, "the warm-up jobs")
        time.sleep(1.0)  # the probes' last flush
        before = _sql_counts(counts_dir)
        commands = _commands(r)
        path = tmp / "jobs.jsonl"
        _jobs_file(path, n, "bench")
        t0 = time.perf_counter()
        submit(path)
        _wait(lambda: terminal() >= 200 + n, f"{n} jobs terminal")
        elapsed = time.perf_counter() - t0
        redis_per_job = (_commands(r) - commands) / n
        time.sleep(1.0)
        after = _sql_counts(counts_dir)
        per_job = {k: (after[k] - before.get(k, 0)) / n for k in after}
        status = dict(db.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())
        print(f"fleet jobs by status: {status}")
        return n / elapsed, per_job, redis_per_job
    finally:
        _stop(procs)
        db.close()


def _sql_counts(directory: Path) -> collections.Counter[str]:
    total: collections.Counter[str] = collections.Counter()
    for path in directory.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):  # a file being replaced
            total.update(json.loads(path.read_text()))
    return total


def bare(n: int, tmp: Path) -> float:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("TIERFLEET_", "DD_"))},
           "REDIS_URL": REDIS_URL, "PYTHONPATH": str(ROOT)}  # fmt: skip
    celery = [sys.executable, "-m", "celery", "-A", "bench._bare", "worker", "--loglevel",
              "warning", "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
    log = tmp / "bare.log"
    procs = [
        _start([*celery, "-Q", "bench.a", "--pool", "prefork", "-c", str(CORES)], env, log),
        _start([*celery, "-Q", "bench.b", "--pool", "threads", "-c", "8"], env, log),
    ]
    r = redis.Redis.from_url(REDIS_URL)
    sys.path.insert(0, str(ROOT))
    os.environ["REDIS_URL"] = REDIS_URL
    from bench._bare import DONE_KEY, app

    try:
        with app.producer_or_acquire() as producer:
            for i in range(200):
                app.send_task("bench.hop1", args=[f"warm-{i}"], queue="bench.a", producer=producer)
        _wait(lambda: int(r.get(DONE_KEY) or 0) >= 200, "the warm-up chains")
        t0 = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for i in range(n):
                app.send_task("bench.hop1", args=[f"job-{i}"], queue="bench.a", producer=producer)
        _wait(lambda: int(r.get(DONE_KEY) or 0) >= 200 + n, f"{n} chains done")
        return n / (time.perf_counter() - t0)
    finally:
        _stop(procs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    args = parser.parse_args()
    name = f"tierfleet_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    db_url = f"{ADMIN_URL.rsplit('/', 1)[0]}/{name}".replace(
        "postgresql://", "postgresql+psycopg://"
    )
    try:
        env = {**os.environ, "DATABASE_URL": db_url, "REDIS_URL": REDIS_URL}
        subprocess.run([sys.executable, "-m", "tierfleet", "db", "upgrade"], env=env,
                       cwd=ROOT, check=True, capture_output=True)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            redis.Redis.from_url(REDIS_URL).flushdb()
            bare_rate = bare(args.jobs, Path(tmp))
            redis.Redis.from_url(REDIS_URL).flushdb()
            fleet_rate, per_job, redis_per_job = fleet(args.jobs, db_url, Path(tmp))
        print(f"bare two-hop Celery chains: {bare_rate:,.0f}/s")
        print(
            f"fleet (submit, triage, small tier, 10% to frontier, ledger): {fleet_rate:,.0f} jobs/s"
        )
        round_trips = {k: v for k, v in per_job.items() if k not in ("BEGIN",)}
        print(f"Postgres statements per job: {sum(round_trips.values()):.2f}")
        for kind, n in sorted(round_trips.items(), key=lambda kv: -kv[1]):
            if n >= 0.005:
                print(f"  {n:6.2f}  {kind}")
        print(f"Redis commands per job: {redis_per_job:.1f}")
        print(f"fleet_vs_bare_celery: {fleet_rate / bare_rate:.2f}")
        return 0
    finally:
        redis.Redis.from_url(REDIS_URL).flushdb()
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    sys.exit(main())
