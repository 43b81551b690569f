"""Security guarantees, each checked against the real thing.

1. Secrets (the Postgres and Redis passwords inside DATABASE_URL / REDIS_URL,
   ANTHROPIC_API_KEY, VLLM_API_KEY) never show: not in the repr or str of anything that
   holds them, not in the error raised when a service does not answer, not in what the CLI
   prints, not in worker logs, not in ledger rows, broker messages or metrics.
2. A job over `MAX_ENVELOPE_BYTES` is refused at submit, naming its size, on the single-job
   path (`Client.submit`) and on the bulk path (`tierfleet submit`), before anything is
   written or enqueued.
3. SQL text is built from module constants only; values always travel as bound
   parameters. Checked by reading the source (ast) of every module of the three packages.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import re
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select, text

from producers import Client, bulk
from producers.jsonl import open_input
from tests.conftest import ROOT, StatsdListener, Workers, wait_until
from tests.e2e.test_fleet import all_terminal
from tests.fakes import Answer, Drop, Error, Hang
from tierfleet.constants import JobStatus
from tierfleet.db import Ledger, check_ledger, engine_from_settings
from tierfleet.envelope import MAX_ENVELOPE_BYTES, parse_envelope
from tierfleet.errors import InvalidEnvelope, ServiceUnavailable
from tierfleet.models import Attempt, Batch, Job
from tierfleet.settings import Settings
from tierfleet.transport import make_celery

pytestmark = pytest.mark.chaos

DB_PASSWORD = "pg-S3cretPw-4411"
REDIS_PASSWORD = "redis-R3disPw-4412"
ANTHROPIC_KEY = "sk-ant-api03-S3CRET-4413"
VLLM_KEY = "vllm-S3CRET-key-4414"
SECRETS = (DB_PASSWORD, REDIS_PASSWORD, ANTHROPIC_KEY, VLLM_KEY)

CLOSED = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once
CLOSED_DB = f"postgresql://postgres:{DB_PASSWORD}@{CLOSED}/ledger"
CLOSED_REDIS = f"redis://:{REDIS_PASSWORD}@{CLOSED}/0"
SHOWN_DB = f"postgresql+psycopg://postgres:***@{CLOSED}/ledger"
SHOWN_REDIS = f"redis://:***@{CLOSED}/0"


def leaked(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def with_password(url: str, password: str) -> str:
    """`url` with `password` in its user part (trust auth and a password-less Redis
    accept it, unused)."""
    scheme, rest = url.split("://", 1)
    user, _, host = rest.rpartition("@")
    return f"{scheme}://{user}:{password}@{host}"


def secret_env(**overrides: str) -> dict[str, str]:
    """Every secret set, the services at a closed port, unless overridden."""
    return {
        "DATABASE_URL": CLOSED_DB,
        "REDIS_URL": CLOSED_REDIS,
        "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
        "VLLM_API_KEY": VLLM_KEY,
        **overrides,
    }


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TIERFLEET_", "DD_"))}
    return subprocess.Popen(
        [sys.executable, "-m", "tierfleet", *args],
        env={**clean, **env},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def outcomes(procs: dict[str, subprocess.Popen[str]]) -> dict[str, tuple[int, str]]:
    """command -> (exit code, stdout + stderr), for processes started together."""
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=90)
        out[name] = (proc.returncode, stdout + stderr)
    return out


# --- 1. secrets -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("database_url", "vllm_key_name"),
    [
        (CLOSED_DB, "VLLM_API_KEY"),
        # libpq also takes the password as a query parameter; the key's prefixed name
        (f"postgresql://postgres@{CLOSED}/ledger?password={DB_PASSWORD}", "TIERFLEET_VLLM_API_KEY"),
    ],
    ids=["password-in-user-part", "password-in-query"],
)
def test_no_object_that_holds_a_secret_shows_it(
    monkeypatch: pytest.MonkeyPatch, database_url: str, vllm_key_name: str
) -> None:
    from workers.app import create_app
    from workers.runtime import Runtime, WorkerSpec

    env = secret_env(DATABASE_URL=database_url, TIERFLEET_BACKEND="real")
    env[vllm_key_name] = env.pop("VLLM_API_KEY")
    env["VLLM_BASE_URL"] = f"http://{CLOSED}/v1"
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings.from_env()
    celery = create_app(settings)
    rt = Runtime.build(settings, celery, db_pool_size=2)
    client = Client(settings, rt.ledger, celery)
    try:
        # The secrets really are in there, and usable.
        assert settings.anthropic_api_key and settings.vllm_api_key
        assert settings.vllm_api_key.get_secret_value() == VLLM_KEY
        assert DB_PASSWORD in rt.ledger.engine.url.render_as_string(hide_password=False)
        assert celery.conf.broker_url == CLOSED_REDIS
        assert type(rt.backends["slm"]).__name__ == "VLLMBackend"
        assert type(rt.backends["frontier"]).__name__ == "AnthropicBackend"

        with celery.connection_for_write() as connection:
            broker = repr(connection) + connection.as_uri()
        shown = {
            "Settings": repr(settings) + str(settings) + str(settings.model_dump()),
            "Settings as JSON": settings.model_dump_json(),
            "Celery app": repr(celery) + str(celery),
            "Celery conf": repr(celery.conf) + str(celery.conf) + repr(dict(celery.conf)),
            "Celery conf, as `celery report` prints it": celery.conf.humanize(),
            "broker connection": broker,
            "Runtime": repr(rt) + str(rt),
            "WorkerSpec": repr(WorkerSpec(settings, celery)),
            "Ledger and engine": repr(rt.ledger) + repr(rt.ledger.engine) + str(rt.ledger.engine),
            "engine URL": repr(rt.ledger.engine.url) + str(rt.ledger.engine.url),
            "backends": repr(rt.backends) + str(rt.backends),
            "Client": repr(client) + str(client),
        }
        assert {name: leaked(text) for name, text in shown.items() if leaked(text)} == {}
    finally:
        client.close()
        rt.close()


@pytest.mark.parametrize(
    "database_url",
    [CLOSED_DB, f"postgresql://postgres@{CLOSED}/ledger?password={DB_PASSWORD}"],
    ids=["password-in-user-part", "password-in-query"],
)
def test_an_unreachable_ledger_is_named_without_its_password(database_url: str) -> None:
    ledger = Ledger(engine_from_settings(Settings(database_url=database_url)))
    with pytest.raises(ServiceUnavailable) as info:
        check_ledger(ledger)
    assert str(info.value).startswith(f"cannot reach the ledger at {SHOWN_DB}: ")
    assert "Connection refused" in str(info.value)
    # the whole chain, as a traceback would print it: the driver's error is on it
    chain = "".join(traceback.format_exception(info.value))
    assert "psycopg" in chain
    assert leaked(chain + repr(info.value)) == []


def test_the_client_shows_no_secret_when_a_service_does_not_answer(
    fleet_env: dict[str, str], ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError as LedgerError

    database_url = with_password(fleet_env["DATABASE_URL"], DB_PASSWORD)
    for down, database, broker, error in [
        ("Postgres", CLOSED_DB, fleet_env["REDIS_URL"], LedgerError),
        ("Redis", database_url, CLOSED_REDIS, ServiceUnavailable),  # the job saved, queued
    ]:
        monkeypatch.setenv("DATABASE_URL", database)
        monkeypatch.setenv("REDIS_URL", broker)
        client = Client.from_env()
        try:
            with pytest.raises(error) as info:
                client.submit({"feature": "f", "prompt": "hello"})
        finally:
            client.close()
        chain = "".join(traceback.format_exception(info.value))
        assert "Connection refused" in chain, down
        assert leaked(chain) == [], down


CLI_WITH_NOTHING_REACHABLE = {
    "status": ["status", "nope"],
    "results": ["results", "nope"],
    "cancel": ["cancel", "nope"],
    "retry": ["retry", "nope", "--failed"],
    "job get": ["job", "get", "nope"],
    "submit": ["submit", "{jobs}"],
    "db upgrade": ["db", "upgrade"],
    "worker": ["worker", "--pool", "all"],
    "demo": ["demo", "--jobs", "2"],
}


def test_the_cli_names_an_unreachable_ledger_without_a_secret_or_a_traceback(
    tmp_path: Path,
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"feature": "f", "prompt": "hello"}\n')
    env = secret_env(TIERFLEET_BACKEND="sim")
    procs = {
        name: run_cli([a.format(jobs=jobs) for a in args], env)
        for name, args in CLI_WITH_NOTHING_REACHABLE.items()
    }
    wrong = {}
    for name, (code, output) in outcomes(procs).items():
        problems = []
        if code != 3:
            problems.append(f"exit {code}, not 3")
        if "Traceback" in output:
            problems.append("a traceback")
        if not re.search(rf"error: cannot reach (the ledger at )?{re.escape(SHOWN_DB)}", output):
            problems.append("no line naming the ledger")
        if leaked(output):
            problems.append(f"secrets {leaked(output)}")
        if problems:
            wrong[name] = (problems, output[-1500:])
    assert wrong == {}


def test_the_cli_names_an_unreachable_broker_without_a_secret_or_a_traceback(
    fleet_env: dict[str, str], ledger: Ledger, tmp_path: Path
) -> None:
    database_url = with_password(fleet_env["DATABASE_URL"], DB_PASSWORD)
    with ledger.session() as s:  # a batch with a failed job, for `retry --failed`
        s.add(Batch(id="b-failed", name="failed", options={}, job_count=1))
        s.add(
            Job(
                id="b-failed.1", batch_id="b-failed", line=1, feature="f", route="auto",
                latency="batch", status=JobStatus.FAILED, attempt_count=1, error="bad answer",
                payload=parse_envelope({"feature": "f", "prompt": "x"}).payload(),
            )
        )  # fmt: skip
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"feature": "f", "prompt": "hello"}\n')
    env = secret_env(DATABASE_URL=database_url, TIERFLEET_BACKEND="sim")
    procs = {
        "submit": run_cli(["submit", str(jobs)], env),
        "retry": run_cli(["retry", "b-failed", "--failed"], env),
        "demo": run_cli(["demo", "--jobs", "2"], env),
    }
    wrong = {}
    for name, (code, output) in outcomes(procs).items():
        problems = []
        if code != 3:
            problems.append(f"exit {code}, not 3")
        if "Traceback" in output:
            problems.append("a traceback")
        if f"error: cannot reach the broker at {SHOWN_REDIS}: " not in output:
            problems.append("no line naming the broker")
        if leaked(output):
            problems.append(f"secrets {leaked(output)}")
        if problems:
            wrong[name] = (problems, output[-1500:])
    assert wrong == {}
    with ledger.session() as s:  # nothing was sent, so nothing changed: run it again later
        assert s.get_one(Job, "b-failed.1").status is JobStatus.FAILED


def test_a_worker_that_cannot_reach_redis_logs_it_without_the_password(
    fleet_env: dict[str, str], start_workers: Callable[..., Workers]
) -> None:
    workers = start_workers(
        "all",
        concurrency=1,
        **secret_env(
            DATABASE_URL=with_password(fleet_env["DATABASE_URL"], DB_PASSWORD),
            TIERFLEET_LOG_LEVEL="DEBUG",
        ),
    )
    wait_until(
        lambda: f"Cannot connect to {SHOWN_REDIS.replace('***', '**')}" in workers.output(),
        timeout_s=30,
        what=f"the worker's broker error\n{workers.output()[-2000:]}",
    )
    assert leaked(workers.output()) == []


def all_rows(ledger: Ledger) -> str:
    """Every row of every table of the ledger, as text."""
    with ledger.begin() as conn:
        tables = conn.execute(
            text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        ).scalars()
        return "\n".join(
            row
            for table in list(tables)
            for row in conn.execute(text(f'SELECT t::text FROM "{table}" t')).scalars()
        )


def broker_contents(redis_url: str) -> str:
    """Every key and value in the test's Redis database, as text."""
    readers: dict[str, Callable[[redis.Redis, bytes], Any]] = {
        "string": lambda r, k: r.get(k),
        "list": lambda r, k: r.lrange(k, 0, -1),
        "hash": lambda r, k: r.hgetall(k),
        "set": lambda r, k: r.smembers(k),
        "zset": lambda r, k: r.zrange(k, 0, -1, withscores=True),
    }
    with redis.Redis.from_url(redis_url) as r:
        return "\n".join(
            f"{key!r} {readers[r.type(key).decode()](r, key)!r}" for key in r.scan_iter()
        )


def test_a_fleet_run_with_every_secret_set_leaks_none(
    fleet_env: dict[str, str],
    real_env: dict[str, str],
    fake_vllm: Any,
    fake_anthropic: Any,
    ledger: Ledger,
    redis_url: str,
    statsd: StatsdListener,
    start_workers: Callable[..., Workers],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Real worker processes and the real provider clients (against the fakes), with
    faults on both tiers so that errors reach the ledger; then every place the run wrote
    to is searched for the secrets."""
    env = {
        **real_env,
        **secret_env(
            DATABASE_URL=with_password(fleet_env["DATABASE_URL"], DB_PASSWORD),
            REDIS_URL=with_password(redis_url, REDIS_PASSWORD),
        ),
        "TIERFLEET_LOG_LEVEL": "DEBUG",
        "TIERFLEET_SLM_TIMEOUT_BASE_S": "0.5",
        "TIERFLEET_SLM_TIMEOUT_PER_TOKEN_S": "0",
    }
    fake_vllm.when("[case vllm-401]", Error(401, message="invalid api key"))
    fake_vllm.when("[case vllm-drop]", Drop(), Answer())
    fake_vllm.when("[case vllm-hang]", Hang(5))
    fake_anthropic.when("[case claude-drop]", Drop(), Answer())
    fake_anthropic.when("[case claude-400]", Error(400, message="prompt is too long"))
    fake_anthropic.when("[case claude-500]", Error(500), Answer())
    cases = ["vllm-401", "vllm-drop", "vllm-hang", "claude-drop", "claude-400", "claude-500"]
    workers = start_workers("triage", "slm", "frontier", concurrency=4, **env)

    for key in ("DATABASE_URL", "REDIS_URL", "DD_AGENT_HOST", "DD_DOGSTATSD_PORT"):
        monkeypatch.setenv(key, env[key])
    client = Client.from_env()  # the producer side, with the same secrets
    try:
        for case in cases:
            route = "frontier" if case.startswith("claude") else "slm"
            client.submit({"feature": "f", "prompt": f"[case {case}] hi", "route": route})
    finally:
        client.close()
    lines = tmp_path / "jobs.jsonl"
    lines.write_text(
        "".join(
            json.dumps({"feature": "bulk", "prompt": f"[case {case}] hello", "route": route}) + "\n"
            for case, route in [("vllm-drop", "slm"), ("claude-500", "frontier"), ("x", "auto")]
        )
    )
    submitted = run_cli(["submit", str(lines), "--json"], env)
    code, submit_output = outcomes({"submit": submitted})["submit"]
    assert code == 0, submit_output
    batch_id = json.loads(submit_output.splitlines()[0])["batch_id"]

    wait_until(
        lambda: all_terminal(ledger, len(cases) + 3),
        timeout_s=90,
        what=f"terminal jobs\n{workers.output()[-3000:]}",
    )
    follow_up = outcomes(
        {
            "status": run_cli(["status", batch_id, "--json"], env),
            "results": run_cli(["results", batch_id], env),
        }
    )
    with ledger.session() as s:
        errors = s.execute(select(Attempt.error).where(Attempt.error.is_not(None))).scalars()
        assert len(set(errors)) >= 4, "the faults put their errors in the ledger"
    # the keys were in use: each provider was sent its own
    assert all(VLLM_KEY in r.headers["authorization"] for r in fake_vllm.requests)
    assert all(ANTHROPIC_KEY in str(r.headers) for r in fake_anthropic.requests)

    searched = {
        "worker logs": workers.output(),
        "ledger rows": all_rows(ledger),
        "broker": broker_contents(redis_url),
        "metrics": "\n".join(statsd.packets),
        "CLI output": submit_output + "".join(out for _, out in follow_up.values()),
        "request bodies": json.dumps(
            [r.body for r in fake_vllm.requests + fake_anthropic.requests]
        ),
    }
    assert "action=attempt.done" in searched["worker logs"]
    assert {name: leaked(text) for name, text in searched.items() if leaked(text)} == {}


# --- 2. payload size limits -------------------------------------------------------------


def triage_messages(redis_url: str, queue: str) -> int:
    with redis.Redis.from_url(redis_url) as r:
        return int(r.llen(queue))


def prompt_of_size(total: int) -> str:
    """A prompt that makes the job exactly `total` bytes of JSON."""
    base = len(parse_envelope({"feature": "f", "prompt": "x"}).payload_json(limit=10**9))
    return "x" * (total - base + 1)


def test_client_submit_refuses_a_job_over_the_size_limit_and_writes_nothing(
    client: Client, ledger: Ledger, redis_url: str
) -> None:
    queue = client.settings.queue_triage
    at_limit = {"feature": "f", "prompt": prompt_of_size(MAX_ENVELOPE_BYTES), "id": "at-limit"}
    over = {**at_limit, "prompt": at_limit["prompt"] + "x", "id": "over"}
    # a million bytes in a third as many characters: the limit is on bytes
    wide = {"feature": "f", "prompt": "€" * (MAX_ENVELOPE_BYTES // 3), "id": "wide"}

    assert client.submit(at_limit) == "at-limit"
    with pytest.raises(InvalidEnvelope) as info:
        client.submit(over)
    assert str(info.value) == (
        f"the job is {MAX_ENVELOPE_BYTES + 1:,} bytes as JSON, "
        f"over the {MAX_ENVELOPE_BYTES:,}-byte limit"
    )
    wide_size = len(parse_envelope(wide).payload_json(limit=2 * MAX_ENVELOPE_BYTES))
    with pytest.raises(InvalidEnvelope, match=f"the job is {wide_size:,} bytes as JSON"):
        client.submit(wide)

    with ledger.session() as s:
        assert s.execute(select(Job.id)).scalars().all() == ["at-limit"]
        stored = s.execute(select(Job.payload).where(Job.id == "at-limit")).scalar_one()
    assert stored == parse_envelope(at_limit).payload()
    assert triage_messages(redis_url, queue) == 1


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_bulk_submit_takes_a_line_at_the_size_limit_and_refuses_one_byte_more(
    settings: Settings, ledger: Ledger, redis_url: str, tmp_path: Path, suffix: str
) -> None:
    def line(size: int) -> bytes:
        head, tail = b'{"feature": "f", "prompt": "', b'"}'
        return head + b"x" * (size - len(head) - len(tail)) + tail

    data = line(MAX_ENVELOPE_BYTES) + b"\n" + line(MAX_ENVELOPE_BYTES + 1) + b"\n"
    path = tmp_path / f"jobs{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    celery = make_celery(settings)
    try:
        with open_input(str(path)) as source:
            report = bulk.submit(
                source, bulk.BatchOptions(skip_invalid=True), ledger, celery,
                settings.queue_triage,
            )  # fmt: skip
    finally:
        celery.close()
    assert [str(e) for e in report.errors] == [
        f"line 2: {MAX_ENVELOPE_BYTES + 1:,} bytes is over the {MAX_ENVELOPE_BYTES:,}-byte limit"
    ]
    assert report.written == 1
    with ledger.session() as s:
        assert s.execute(select(Job.line)).scalars().all() == [1]


# --- 3. SQL only through bound parameters -----------------------------------------------

SQL_CALLS = {"text", "exec_driver_sql", "execute", "executemany", "copy"}
CONSTANT = re.compile(r"_?[A-Z][A-Z0-9_]*")
SCANNED = ("tierfleet", "producers", "workers")


def _in_scope(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """The nodes of `body`, but not of the functions and classes defined in it."""
    todo: list[ast.AST] = list(body)
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            todo.extend(ast.iter_child_nodes(node))


def _assignments(body: list[ast.stmt]) -> dict[str, list[ast.expr]]:
    """name -> the values assigned to it in `body` (`x += y` assigns `x + y`)."""
    out: dict[str, list[ast.expr]] = {}
    for node in _in_scope(body):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        out.setdefault(name.id, []).append(node.value)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign) and isinstance(node.target, ast.Name):
            value = node.value
            if isinstance(node, ast.AugAssign):
                value = ast.BinOp(node.target, node.op, node.value)
            if value is not None:
                out.setdefault(node.target.id, []).append(value)
    return out


class SqlCheck(ast.NodeVisitor):
    """Finds SQL text given to `text()`, `exec_driver_sql()`, `.execute()`,
    `.executemany()` or `.copy()` that is built (f-string, `+`, `%`, `.format()`,
    `.join()`, also by way of a variable) from anything but literals and the module's
    own UPPER_CASE constants (themselves built the same way)."""

    def __init__(self, tree: ast.Module, filename: str) -> None:
        self.filename = filename
        self.module = _assignments(tree.body)
        self.local = self.module
        self.problems: list[str] = []
        self.checked: list[str] = []
        self.visit(tree)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        outer, self.local = self.local, _assignments(node.body)
        self.generic_visit(node)
        self.local = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if name in SQL_CALLS and node.args:
            self.checked.append(name)
            for part in self.unsafe(node.args[0], in_text=False, seen=frozenset()):
                self.problems.append(
                    f"{self.filename}:{node.lineno}: {name}() gets SQL built from `{part}`"
                )
        self.generic_visit(node)

    def unsafe(self, expr: ast.expr, *, in_text: bool, seen: frozenset[str]) -> list[str]:
        """The parts of `expr` that may carry a run-time value into SQL text."""

        def each(*parts: ast.expr, text: bool = True) -> list[str]:
            return [p for part in parts for p in self.unsafe(part, in_text=text, seen=seen)]

        if isinstance(expr, ast.Constant) or (isinstance(expr, ast.Name) and expr.id in seen):
            return []
        if isinstance(expr, ast.Name):
            seen = seen | {expr.id}
            if CONSTANT.fullmatch(expr.id) and expr.id in self.module:
                return each(*self.module[expr.id])  # a constant: built of constants too?
            if self.local is not self.module and expr.id in self.local:
                return each(*self.local[expr.id], text=in_text)  # a local: what it holds
            if in_text:
                return [expr.id]  # a parameter, a global variable: any value at all
            return each(*self.module.get(expr.id, []), text=False)  # the whole statement
        if isinstance(expr, ast.JoinedStr):
            return each(*(v.value for v in expr.values if isinstance(v, ast.FormattedValue)))
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add | ast.Mod):
            return each(expr.left, expr.right)
        if isinstance(expr, ast.Tuple | ast.List) and in_text:
            return each(*expr.elts)
        if isinstance(expr, ast.IfExp):
            return each(expr.body, expr.orelse, text=in_text)
        if isinstance(expr, ast.Call) and getattr(expr.func, "attr", None) in ("format", "join"):
            assert isinstance(expr.func, ast.Attribute)
            return each(expr.func.value, *expr.args, *(k.value for k in expr.keywords))
        return [ast.unparse(expr)] if in_text else []  # a statement object is no text


def sql_problems(source: str, filename: str = "<test>") -> tuple[list[str], list[str]]:
    """(problems, the SQL calls checked) in one module's source."""
    check = SqlCheck(ast.parse(source, filename), filename)
    return check.problems, check.checked


def test_sql_text_is_built_from_module_constants_only() -> None:
    problems: list[str] = []
    checked: dict[str, list[str]] = {}
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = str(path.relative_to(ROOT))
            found, calls = sql_problems(path.read_text(encoding="utf-8"), name)
            problems += found
            checked[name] = calls
    assert problems == []
    # the check saw the statements it is about: COPY and the staging SQL of bulk submit
    assert {"text", "copy", "execute"} <= set(checked["producers/copy.py"])
    assert sum(len(calls) for calls in checked.values()) > 20


BUILT_FROM_VALUES = {
    "f-string": """
def f(conn, job_id):
    conn.execute(text(f"SELECT 1 FROM jobs WHERE id = '{job_id}'"))
""",
    "concatenation": """
def f(conn, job_id):
    conn.exec_driver_sql("DELETE FROM jobs WHERE id = " + job_id)
""",
    "percent": """
def f(cur, name):
    cur.execute("SELECT * FROM %s" % name)
""",
    "percent, a tuple": """
def f(cur, a, b):
    cur.execute("SELECT %s FROM %s" % (a, b))
""",
    "format": """
def f(cur, name):
    cur.execute("SELECT * FROM {}".format(name))
""",
    "join": """
def f(conn, columns):
    conn.execute(text("SELECT " + ", ".join(columns)))
""",
    "by way of a variable": """
def f(cur, name):
    sql = f"SELECT * FROM {name}"
    cur.execute(sql)
""",
    "by way of +=": """
def f(cur, name):
    sql = "SELECT * FROM "
    sql += name
    cur.executemany(sql, [])
""",
    "copy": """
def f(cur, table):
    with cur.copy(f"COPY {table} FROM STDIN"):
        pass
""",
    "an attribute": """
import sqlalchemy
def f(self):
    sqlalchemy.text(f"SELECT * FROM {self.table}")
""",
    "a call": """
def f(conn, x):
    conn.execute(text(f"SELECT {str(x)}"))
""",
    "a lower-case global": """
table = "jobs"
def f(conn):
    conn.execute(text(f"SELECT * FROM {table}"))
""",
    "an upper-case name that is no constant": """
import os
TABLE = os.environ["TABLE"]
def f(conn):
    conn.execute(text(f"SELECT * FROM {TABLE}"))
""",
    "a global variable": """
import os
query = f"SELECT * FROM {os.environ['TABLE']}"
def f(conn):
    conn.execute(text(query))
""",
    "at module level": """
import os
conn.execute(text("SELECT " + os.environ["X"]))
""",
}

BOUND_OR_CONSTANT = {
    "a literal": """
def f(cur):
    cur.execute("PRAGMA foreign_keys=ON")
""",
    "a bound parameter": """
def f(conn, i):
    conn.execute(text("SELECT 1 FROM jobs WHERE id = :i"), {"i": i})
""",
    "a driver parameter": """
def f(cur, i):
    cur.execute("SELECT %s", (i,))
""",
    "module constants": """
COLUMNS = ("a", "b")
_COLUMN_LIST = ", ".join(COLUMNS)
_TABLE = "jobs"
def f(conn):
    conn.execute(text(f"SELECT {_COLUMN_LIST} FROM {_TABLE}"))
""",
    "constants by way of a variable": """
_A = "COPY a FROM STDIN"
_B = "COPY b FROM STDIN"
def f(cur, stage):
    sql = _A if stage else _B
    sql += " (FORMAT text)"
    cur.copy(sql)
""",
    "a statement object": """
def f(conn, i):
    conn.execute(select(Job).where(Job.id == i))
""",
    "a prebuilt statement": """
def f(conn, i):
    conn.execute(sql.CLAIM, {"p_id": i})
""",
}


@pytest.mark.parametrize("source", BUILT_FROM_VALUES.values(), ids=BUILT_FROM_VALUES.keys())
def test_the_sql_check_catches_text_built_from_values(source: str) -> None:
    problems, checked = sql_problems(source)
    assert checked and problems


@pytest.mark.parametrize("source", BOUND_OR_CONSTANT.values(), ids=BOUND_OR_CONSTANT.keys())
def test_the_sql_check_accepts_constants_and_bound_parameters(source: str) -> None:
    problems, checked = sql_problems(source)
    assert checked and problems == []
