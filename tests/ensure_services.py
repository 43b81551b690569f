"""Make sure the Redis and Postgres the tests use answer; start local ones if needed.

Reads TIERFLEET_TEST_REDIS_URL and TIERFLEET_TEST_DATABASE_URL (defaults: the local
servers on 127.0.0.1). Where a server does not answer and its binary is installed, it is
started the way this project's CI machines start it; otherwise this stops with a message
naming what to install. Exit status 0 when both answer.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time

import psycopg
import redis

REDIS_URL = os.environ.get("TIERFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
PG_URL = os.environ.get(
    "TIERFLEET_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)

REDIS_START = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
]
HINT = (
    "install it (Debian/Ubuntu: apt-get install {pkg}; macOS: brew install {brew}) or run "
    "`docker compose up -d redis postgres` and set {env}"
)


def redis_ok() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def postgres_ok() -> bool:
    try:
        psycopg.connect(PG_URL.replace("+psycopg", ""), connect_timeout=2).close()
        return True
    except psycopg.Error:
        return False


def start_redis() -> bool:
    if not shutil.which("redis-server"):
        return False
    os.makedirs("/var/lib/redis", exist_ok=True)
    os.makedirs("/var/log/redis", exist_ok=True)
    return subprocess.run(REDIS_START, check=False).returncode == 0


def start_postgres() -> bool:
    if shutil.which("pg_ctlcluster"):
        versions = sorted(os.path.basename(p) for p in glob.glob("/etc/postgresql/*"))
        if versions:
            cmd = ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"]
            return subprocess.run(cmd, check=False).returncode == 0
    return False


def wait_for(check: object, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.5)
    return False


def main() -> int:
    problems = []
    if not redis_ok():
        print(f"Redis at {REDIS_URL} does not answer; starting a local server", flush=True)
        if not (start_redis() and wait_for(redis_ok)):
            problems.append(
                "Redis: "
                + HINT.format(pkg="redis-server", brew="redis", env="TIERFLEET_TEST_REDIS_URL")
            )
    if not postgres_ok():
        print("Postgres does not answer; starting the local cluster", flush=True)
        if not (start_postgres() and wait_for(postgres_ok)):
            problems.append(
                "PostgreSQL: "
                + HINT.format(
                    pkg="postgresql", brew="postgresql@16", env="TIERFLEET_TEST_DATABASE_URL"
                )
            )
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print("Redis and Postgres answer")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
