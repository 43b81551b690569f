"""The memory of `tierfleet serve` while callers read a large batch output file.

A batch of N succeeded jobs (about 4 KB of answer each, so some 40 MB of output file) is
written straight into a scratch ledger; then `tierfleet serve` runs as a subprocess and
C callers at once ask for (a) the output file's metadata (`GET /v1/files/{id}`, its
`bytes`) and (b) its content. For each: the server's peak RSS (VmHWM, reset between the
two through /proc/PID/clear_refs), the wall time, and for (b) the time to the first byte.

    .venv/bin/python bench/api_output_file.py [--jobs 10000] [--callers 12]

Uses BENCH_DATABASE_URL's server (a scratch database is made and dropped) and
BENCH_REDIS_URL (default redis://127.0.0.1:6379/12, for the rate limiter).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
BATCH = "batch_bench0output0file0000"


def fill(url: str, n: int) -> str:
    """The batch and its jobs; returns a bearer token of its team."""
    sys.path.insert(0, str(ROOT))
    from producers.api import tokens
    from tierfleet.db import Ledger, make_engine, upgrade

    upgrade(url)
    ledger = Ledger(make_engine(url))
    token = tokens.create(ledger, "bench")[1]
    ledger.engine.dispose()
    answer = json.dumps({"summary": "the lid cracked after a week; " * 130})
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        conn.execute(
            "INSERT INTO api_batches (id, team, input_file_id, endpoint, completion_window, "
            "batch_id, requests) VALUES (%s, 'bench', 'file-x', '/v1/chat/completions', "
            "'24h', %s, %s)",
            (BATCH, "b-" + BATCH, n),
        )
        with conn.cursor().copy(
            "COPY jobs (id, batch_id, line, feature, status, route, latency, payload, result, "
            "cost_usd, attempt_count, attempt_floor, team, finished_at) FROM STDIN"
        ) as copy:
            for i in range(1, n + 1):
                payload = json.dumps({"prompt": f"review {i}", "metadata": {"custom_id": f"r{i}"}})
                copy.write_row((f"j{i}", "b-" + BATCH, i, "reviews", "succeeded", "auto",
                                "batch", payload, answer, "0.0001", 1, 0, "bench",
                                "2026-12-05T10:00:00Z"))  # fmt: skip
        with conn.cursor().copy(
            "COPY attempts (id, job_id, seq, tier, model, provider, outcome, input_tokens, "
            "output_tokens, cache_read_tokens, cache_write_tokens, latency_ms, cost_usd, "
            "feature, started_at) FROM STDIN"
        ) as copy:
            for i in range(1, n + 1):
                row = (f"a{i}", f"j{i}", 1, "slm", "sim-slm", "sim", "succeeded", 100, 900, 0, 0,
                       10, "0.0001", "reviews", "2026-12-05T10:00:00Z")  # fmt: skip
                copy.write_row(row)
    return token


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def call(url: str, token: str) -> tuple[float, float, int]:
    """(seconds to the first byte, seconds to the last, bytes)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        first = response.read(1)
        first_s = time.perf_counter() - started
        size = len(first) + len(response.read())
    return first_s, time.perf_counter() - started, size


def measure(pid: int, url: str, token: str, callers: int) -> tuple[float, float, float, int]:
    reset_peak(pid)
    started = time.perf_counter()
    with ThreadPoolExecutor(callers) as pool:
        results = list(pool.map(lambda _: call(url, token), range(callers)))
    wall = time.perf_counter() - started
    return peak_rss_mb(pid), wall, max(r[0] for r in results), results[0][2]


def serve(url: str) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": REDIS_URL,
           "TIERFLEET_API_RATE_LIMIT": "100000/second"}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "tierfleet", "serve", "--port", str(port),
                             "--loglevel", "WARNING"], env=env, cwd=ROOT)  # fmt: skip
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--callers", type=int, default=12)
    args = parser.parse_args()
    name = f"tierfleet_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name
    proc = None
    try:
        token = fill(url, args.jobs)
        proc, port = serve(url)
        base = f"http://127.0.0.1:{port}/v1/files/file-out-{BATCH[6:]}"
        idle = peak_rss_mb(proc.pid)
        print(f"{args.jobs:,} jobs, {args.callers} callers at once; server idle: {idle:.0f} MB")
        growth = 0.0
        for what, target in (("metadata", base), ("metadata again", base),
                             ("content", base + "/content")):  # fmt: skip
            peak, wall, first, size = measure(proc.pid, target, token, args.callers)
            print(f"{what:>15}: peak RSS {peak:.0f} MB, {wall:.2f} s for all, first byte "
                  f"after {first:.2f} s at most ({size:,} bytes each)")  # fmt: skip
            served_mb = size * args.callers / 1e6 if what == "content" else 0.0
            growth = (peak - idle) / served_mb if served_mb else growth
        # What the server grew by, per MB it served at once: ~3 when each caller's file is
        # built whole in memory (as JSON rows, then bytes); well under 1 when streamed.
        print(f"content_rss_growth_per_mb_served: {growth:.2f}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
