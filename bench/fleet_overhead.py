"""The fleet's own overhead against bare Celery, on zero-latency simulated models.

In one run, on the real Redis and Postgres, with worker processes started here:

(a) the fleet: `tierfleet submit` of N jobs, then triage (prefork, one process a core),
    the small tier (threads) with 10% of its answers invalid and so escalated, the
    frontier (threads), and the ledger, until every job is terminal;
(b) the baseline: N two-hop no-op Celery chains (`bench/_bare.py`) on the same broker
    and worker settings: hop one on a prefork pool, hop two on a thread pool.

    .venv/bin/python bench/fleet_overhead.py [--jobs 5000] [--profile DIR]

`--profile DIR` samples every fleet worker process with py-spy during the measured run
(flame-graph input in DIR/<pool>.txt, collapsed stacks) and prints each pool's hottest
functions by own time.

Prints jobs/s for both, the SQL statements per job by kind (counted in every worker
process) and the Redis commands per job (the server's `INFO commandstats`), and last
`fleet_vs_bare_celery: X`. Uses BENCH_DATABASE_URL's server (a scratch database, made
and dropped) and BENCH_REDIS_URL (default redis://127.0.0.1:6379/12, flushed).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
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


def _cpu_s(groups: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far (user + system) of each worker process group (label -> its
    leader's pid), of Postgres's processes and of Redis's, read from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    label_of = {pgid: label for label, pgid in groups.items()}
    out: dict[str, float] = collections.defaultdict(float)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # gone
        comm, fields = text[text.index("(") + 1 : text.rindex(")")], text.rsplit(")", 1)[1].split()
        label = label_of.get(int(fields[2]))
        if label is None and comm in ("postgres", "redis-server"):
            label = comm.split("-")[0]
        if label:
            out[label] += (int(fields[11]) + int(fields[12])) / tick
    return out


def _since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {label: after[label] - before.get(label, 0.0) for label in after}


def _print_cpu(name: str, spent: dict[str, float], n: int) -> None:
    parts = ", ".join(f"{label} {1000 * s / n:.2f}" for label, s in sorted(spent.items()))
    print(f"{name} CPU ms per job: {1000 * sum(spent.values()) / n:.2f} ({parts})")


def _commands(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def _jobs_file(path: Path, n: int, prefix: str) -> None:
    with path.open("w") as f:
        for i in range(n):
            envelope = {"feature": "reviews", "prompt": f"{prefix} review {i}: fine",
                        "output_schema": "sentiment", "max_tokens": 64}  # fmt: skip
            f.write(json.dumps(envelope) + "\n")


@dataclasses.dataclass
class Run:
    rate: float  # jobs (or chains) a second
    redis_per_job: float  # commands
    cpu_s: dict[str, float]  # by component, over the measured run
    sql_per_job: dict[tuple[str, str], float] = dataclasses.field(default_factory=dict)


def fleet(n: int, db_url: str, tmp: Path, profile: Path | None = None) -> Run:
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
    pools = {"triage": str(CORES), "slm": "8", "frontier": "4"}
    procs = [
        _start(
            [*tf, "worker", "--pool", pool, "--concurrency", c],
            {**env, "BENCH_SQL_LABEL": pool},
            log,
        )
        for pool, c in pools.items()
    ]
    db = psycopg.connect(db_url.replace("+psycopg", ""), autocommit=True)
    r = redis.Redis.from_url(REDIS_URL)

    def terminal() -> int:
        row = db.execute(
            "SELECT count(*) FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled')"
        ).fetchone()
        return int(row[0]) if row else 0

    def submit(path: Path) -> float:
        """Runs `tierfleet submit`; its CPU seconds."""
        p = subprocess.Popen([*tf, "submit", str(path), "--json"],
                             env={**env, "BENCH_SQL_LABEL": "submit"}, cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        assert p.stderr is not None
        err = p.stderr.read()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            raise SystemExit(f"tierfleet submit failed: {err.decode(errors='replace')}")
        return usage.ru_utime + usage.ru_stime

    samplers: list[subprocess.Popen[bytes]] = []
    try:
        warm = tmp / "warm.jsonl"
        _jobs_file(warm, 200, "warm-up")
        submit(warm)
        _wait(lambda: terminal() >= 200, "the warm-up jobs")
        time.sleep(1.0)  # the probes' last flush
        before = _sql_counts(counts_dir)
        commands = _commands(r)
        groups = {pool: p.pid for pool, p in zip(pools, procs, strict=True)}
        cpu = _cpu_s(groups)
        path = tmp / "jobs.jsonl"
        _jobs_file(path, n, "bench")
        if profile is not None:
            pids = zip(pools, (p.pid for p in procs), strict=True)
            samplers = [_sample(pid, profile / f"{pool}.txt") for pool, pid in pids]
        t0 = time.perf_counter()
        submit_cpu_s = submit(path)
        _wait(lambda: terminal() >= 200 + n, f"{n} jobs terminal")
        elapsed = time.perf_counter() - t0
        redis_per_job = (_commands(r) - commands) / n
        spent = {**_since(cpu, _cpu_s(groups)), "submit": submit_cpu_s}
        time.sleep(1.0)
        after = _sql_counts(counts_dir)
        per_job = {k: (after[k] - before.get(k, 0)) / n for k in after}
        # escalated jobs add the frontier's statements; the small tier books a valid or an
        # invalid answer alike, except that an invalid one also reads the job's counts
        by_status = db.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()
        status: dict[str, int] = dict(by_status)
        print(f"fleet jobs by status: {status}")
        return Run(n / elapsed, redis_per_job, spent, per_job)
    finally:
        _stop(procs)
        db.close()
        for sampler in samplers:
            sampler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            sampler.wait(60)
        if profile is not None:
            for pool in pools:
                _print_profile(pool, profile / f"{pool}.txt")


def _sample(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy on a worker and its pool's children, collapsed stacks to `out`."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    args = [str(spy), "record", "--pid", str(pid), "--subprocesses", "--format", "raw",
            "--rate", "200", "--gil", "--nonblocking", "--output", str(out)]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _print_profile(pool: str, path: Path, top: int = 12) -> None:
    """A pool's hottest functions by own time (the frame a sample was taken in, in the
    thread holding the GIL: Python's CPU time, not its waits)."""
    own: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines() if path.exists() else ():
        stack, _, count = line.rpartition(" ")
        leaf = stack.rsplit(";", 1)[-1]
        if "(" in leaf and count.isdigit():
            own[leaf.rsplit(":", 1)[0]] += int(count)  # the function, not the line
    total = sum(own.values()) or 1
    print(f"{pool}: {total} samples holding the GIL, own time")
    for name, samples in own.most_common(top):
        print(f"  {100 * samples / total:5.1f}%  {name}")


def _sql_counts(directory: Path) -> collections.Counter[tuple[str, str]]:
    """(process label, statement kind) -> statements sent, over every probed process."""
    total: collections.Counter[tuple[str, str]] = collections.Counter()
    for path in directory.glob("*.json"):
        label = path.stem.rsplit("-", 1)[0]
        with contextlib.suppress(OSError, ValueError):  # a file being replaced
            total.update({(label, k): v for k, v in json.loads(path.read_text()).items()})
    return total


_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "SELECT 1")


def _print_statements(per_job: dict[tuple[str, str], float]) -> None:
    """What each process sends Postgres per job, by kind: statements, and the round trips
    around them (BEGIN, COMMIT, a pool's ping). The success path (a job answered by the
    small tier first time) is what submit, triage and the small tier send for every job,
    less the read only an invalid answer makes (`SELECT attempts`, its earlier outcomes)."""
    shown = {k: v for k, v in per_job.items() if v >= 0.0005}
    print(f"Postgres round trips per job: {sum(shown.values()):.2f}")
    for (label, kind), v in sorted(shown.items(), key=lambda kv: (kv[0][0], -kv[1])):
        print(f"  {v:7.3f}  {label:<9} {kind}")
    success = {
        (label, kind): v for (label, kind), v in shown.items()
        if label in ("submit", "triage", "slm") and kind != "SELECT attempts"
    }  # fmt: skip
    statements = sum(v for (_, kind), v in success.items() if kind not in _CONTROL)
    print(f"Postgres round trips per job, success path: {sum(success.values()):.2f}")
    print(f"Postgres statements per job, success path: {statements:.2f} "
          f"(and {sum(success.values()) - statements:.2f} BEGIN, COMMIT, ping)")  # fmt: skip


def bare(n: int, tmp: Path) -> Run:
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
        commands = _commands(r)
        groups = {"hop1": procs[0].pid, "hop2": procs[1].pid}
        cpu = _cpu_s(groups)
        t0 = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for i in range(n):
                app.send_task("bench.hop1", args=[f"job-{i}"], queue="bench.a", producer=producer)
        _wait(lambda: int(r.get(DONE_KEY) or 0) >= 200 + n, f"{n} chains done")
        rate = n / (time.perf_counter() - t0)
        spent = _since(cpu, _cpu_s(groups))
        spent.pop("postgres", None)  # not the chains'
        return Run(rate, (_commands(r) - commands) / n, spent)
    finally:
        _stop(procs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy the fleet's workers")
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
            baseline = bare(args.jobs, Path(tmp))
            redis.Redis.from_url(REDIS_URL).flushdb()
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
            run = fleet(args.jobs, db_url, Path(tmp), args.profile)
        print(f"bare two-hop Celery chains: {baseline.rate:,.0f}/s")
        print(f"fleet (submit, triage, small tier, 10% to frontier, ledger): "
              f"{run.rate:,.0f} jobs/s")  # fmt: skip
        _print_statements(run.sql_per_job)
        print(f"Redis commands per job: {run.redis_per_job:.1f} (bare chains: "
              f"{baseline.redis_per_job:.1f})")  # fmt: skip
        _print_cpu("bare chain", baseline.cpu_s, args.jobs)
        _print_cpu("fleet job", run.cpu_s, args.jobs)
        print(f"fleet_vs_bare_celery: {run.rate / baseline.rate:.2f}")
        return 0
    finally:
        redis.Redis.from_url(REDIS_URL).flushdb()
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    sys.exit(main())
