"""Fixtures: a per-session Postgres database migrated with Alembic, a Redis db, a
DogStatsD listener on loopback, and real worker processes.

Missing services fail the run in CI (CI=true) and skip the tests that need them elsewhere.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from sqlalchemy import text

from tierfleet.db import Ledger, make_engine, upgrade
from tierfleet.models import Base
from tierfleet.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("TIERFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
PG_ADMIN_URL = os.environ.get(
    "TIERFLEET_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is not reachable ({exc}); run `make services` or see README"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh database for this test session, at the Alembic head."""
    name = f"tierfleet_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        _unavailable("PostgreSQL", exc)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    url = f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
    upgrade(url)
    yield url
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(pg_database: str) -> Iterator[str]:
    """The session database, emptied before each test."""
    engine = make_engine(pg_database)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(Base.metadata.tables)} CASCADE"))
    engine.dispose()
    yield pg_database


@pytest.fixture
def ledger(database_url: str) -> Iterator[Ledger]:
    ledger = Ledger(make_engine(database_url))
    yield ledger
    ledger.engine.dispose()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The test Redis db, flushed before each test."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        _unavailable("Redis", exc)
    yield REDIS_URL
    client.flushdb()
    client.close()


@dataclass
class StatsdListener:
    """Captures DogStatsD datagrams sent to 127.0.0.1:`port`."""

    sock: socket.socket
    packets: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def metrics(self) -> list[tuple[str, float, str, dict[str, str]]]:
        """(name, value, type, tags) for every metric line received."""
        out = []
        for packet in list(self.packets):
            for line in packet.splitlines():
                head, *rest = line.split("|")
                name, value = head.rsplit(":", 1)
                tags: dict[str, str] = {}
                for part in rest[1:]:
                    if part.startswith("#"):
                        for tag in part[1:].split(","):
                            k, _, v = tag.partition(":")
                            tags[k] = v
                out.append((name, float(value), rest[0], tags))
        return out


@pytest.fixture
def statsd() -> Iterator[StatsdListener]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    listener = StatsdListener(sock)
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                data = sock.recv(65535)
            except TimeoutError:
                continue
            listener.packets.append(data.decode())

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    yield listener
    stop.set()
    thread.join(2)
    sock.close()


@pytest.fixture
def fleet_env(database_url: str, redis_url: str, statsd: StatsdListener) -> dict[str, str]:
    """Environment for processes of the fleet under test: the test services, fast and
    deterministic simulated models, metrics to the loopback listener."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERFLEET_", "DD_"))}
    env.update(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        DD_AGENT_HOST="127.0.0.1",
        DD_DOGSTATSD_PORT=str(statsd.port),
        TIERFLEET_BACKEND="sim",
        TIERFLEET_SIM_LATENCY_S="0.01",
        TIERFLEET_SIM_INVALID_RATE="0.25",
        TIERFLEET_RETRY_BASE_DELAY_S="0.05",
    )
    return env


@pytest.fixture
def settings(fleet_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in fleet_env.items():
        if key.startswith(("TIERFLEET_", "DD_")) or key in ("REDIS_URL", "DATABASE_URL"):
            monkeypatch.setenv(key, value)
    return Settings.from_env()


@dataclass
class Workers:
    """Worker processes started with `tierfleet worker`; their output goes to a log."""

    procs: list[subprocess.Popen[bytes]]
    log: Path
    handle: Any

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), killed after 20 s."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not self.handle.closed:
            self.handle.close()


@pytest.fixture
def start_workers(fleet_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., Workers]]:
    started: list[Workers] = []

    def start(*pools: str, concurrency: int = 4, fleet: Path | None = None, **env: str) -> Workers:
        """`tierfleet worker --pool POOL` for each pool (`--fleet FILE` when given)."""
        log = tmp_path / f"workers-{len(started)}.log"
        handle = log.open("wb")
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tierfleet",
                    "worker",
                    "--pool",
                    pool,
                    "--concurrency",
                    str(concurrency),
                    *(["--fleet", str(fleet)] if fleet is not None else []),
                ],
                env={**fleet_env, **env},
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
            for pool in (pools or ("all",))
        ]
        workers = Workers(procs, log, handle)
        started.append(workers)
        return workers

    yield start
    for workers in started:
        workers.stop()


def wait_until(
    predicate: Callable[[], Any], *, timeout_s: float = 60.0, what: str = "condition"
) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


@pytest.fixture(scope="session")
def _fake_vllm() -> Iterator[Any]:
    from tests.fakes import FakeVLLM

    with FakeVLLM() as fake:
        yield fake


@pytest.fixture(scope="session")
def _fake_anthropic() -> Iterator[Any]:
    from tests.fakes import FakeAnthropic

    with FakeAnthropic() as fake:
        yield fake


def _fresh(fake: Any) -> Any:
    wait_until(lambda: fake.in_flight == 0, timeout_s=5, what="the previous test's requests")
    fake.reset()
    return fake


@pytest.fixture
def fake_vllm(_fake_vllm: Any) -> Any:
    """The fake vLLM server (one per session), with a clean script for this test."""
    return _fresh(_fake_vllm)


@pytest.fixture
def fake_anthropic(_fake_anthropic: Any) -> Any:
    """The fake Anthropic API (one per session), with a clean script for this test."""
    return _fresh(_fake_anthropic)


@pytest.fixture
def client(settings: Settings, ledger: Ledger) -> Iterator[Any]:
    """The producer client on the test services."""
    from producers import Client
    from tierfleet.transport import make_celery

    client = Client(settings, ledger, make_celery(settings))
    yield client
    client.close()


FAKE_API_KEY = "sk-ant-api03-FAKE-SECRET-KEY"


@pytest.fixture
def real_env(fleet_env: dict[str, str], fake_vllm: Any, fake_anthropic: Any) -> dict[str, str]:
    """`fleet_env` with the real backends, pointed at the fake servers; frontier calls in
    real time (the Message Batches tests turn batches on)."""
    return {
        **fleet_env,
        "TIERFLEET_MESSAGE_BATCHES": "off",
        "TIERFLEET_BACKEND": "real",
        "VLLM_BASE_URL": fake_vllm.base_url,
        "ANTHROPIC_API_KEY": FAKE_API_KEY,
        "ANTHROPIC_BASE_URL": fake_anthropic.base_url,
    }
