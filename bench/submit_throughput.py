"""Bulk submission against the bare broker: how close does `tierfleet submit` get?

In one run: (a) `tierfleet submit FILE --json` of N jobs of about 1 KB each (validation,
COPY into Postgres, one triage message per chunk), as a subprocess whose peak memory is
read from the kernel; (b) the same number of 1-KB messages LPUSHed into Redis with a bare
redis-py pipeline in chunks of 1,000, the ceiling for anything that puts N things on a
Redis queue from one Python process (run before and after the submission; the faster
run is the ceiling).

    .venv/bin/python bench/submit_throughput.py [--jobs 100000]

Uses BENCH_DATABASE_URL's server (a scratch database is made and dropped) and
BENCH_REDIS_URL (default redis://127.0.0.1:6379/12, flushed). Prints jobs/s for both,
the submit's peak RSS, and last `submit_vs_raw_redis: X` (the submission's own rate, as
reported by the command, over the pipeline's; the rate with interpreter start-up is
printed on the line before).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")


def make_file(path: Path, n: int) -> int:
    """N envelopes of about 1 KB (a system prompt, a review, a named output schema)."""
    system = "You label product reviews for the returns team. Answer with the schema. " * 6
    review = "the blender arrived on time, but the lid cracked after a week. " * 5
    with path.open("w") as f:
        for i in range(n):
            envelope = {"feature": "reviews", "system": system, "prompt": f"Review {i}: {review}",
                        "output_schema": "sentiment", "max_tokens": 64}  # fmt: skip
            f.write(json.dumps(envelope) + "\n")
    return path.stat().st_size // n


def raw_redis(n: int, size: int) -> float:
    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    payload = b"x" * size
    t0 = time.perf_counter()
    for start in range(0, n, 1000):
        pipe = r.pipeline(transaction=False)
        for _ in range(min(1000, n - start)):
            pipe.lpush("bench.raw", payload)
        pipe.execute()
    elapsed = time.perf_counter() - t0
    assert r.llen("bench.raw") == n
    r.flushdb()
    r.close()
    return n / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    args = parser.parse_args()

    name = f"tierfleet_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_URL.rsplit("/", 1)[0]
    db_url = f"{base}/{name}"
    try:
        env = {**os.environ, "DATABASE_URL": db_url, "REDIS_URL": REDIS_URL}
        subprocess.run([sys.executable, "-m", "tierfleet", "db", "upgrade"], env=env,
                       cwd=ROOT, check=True, capture_output=True)  # fmt: skip
        redis.Redis.from_url(REDIS_URL).flushdb()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "jobs.jsonl"
            size = make_file(path, args.jobs)
            print(f"{args.jobs:,} jobs, {size} bytes each, {path.stat().st_size / 1e6:.0f} MB")

            raw_before = raw_redis(args.jobs, size)
            t0 = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "tierfleet", "submit", str(path), "--json"],
                env=env, cwd=ROOT, capture_output=True, text=True, check=False,
            )  # fmt: skip
            elapsed = time.perf_counter() - t0
            peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            # The ceiling is measured before and after, and the faster run is kept: a
            # noisy neighbour slowing the pipeline must not flatter the submission.
            raw_rate = max(raw_before, raw_redis(args.jobs, size))
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        summary = json.loads(done.stdout)
        assert summary["written"] == args.jobs, summary
        # Like for like with the pipeline loop: the submission's own time (reading,
        # validating, COPY, enqueueing), not the interpreter's start-up; both printed.
        submit_rate = args.jobs / summary["elapsed_s"]
        print(f"raw redis-py pipeline: {raw_rate:,.0f} messages/s")
        print(f"tierfleet submit:      {submit_rate:,.0f} jobs/s "
              f"({summary['elapsed_s']:.2f} s in the command, {elapsed:.2f} s with process "
              f"start-up; {summary['chunks_enqueued']} chunk messages)")  # fmt: skip
        print(f"submit peak memory: {peak_mb:.0f} MB")
        print(f"submit_with_startup_vs_raw_redis: {args.jobs / elapsed / raw_rate:.2f}")
        print(f"submit_vs_raw_redis: {submit_rate / raw_rate:.2f}")
        return 0
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    sys.exit(main())
