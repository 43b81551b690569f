"""Ladders of three and four rungs, end to end: one real `tierfleet worker --fleet FILE`
process per pool, the real SDKs against one fake server per rung (so each rung's calls
are counted apart), real Redis and Postgres.

Each job carries a marker (`[case NAME]`) that tells each rung's fake what to answer it;
the test then reads the ledger: the rungs tried, in order, each attempt's model, provider,
tokens and price, the job's total, and what every fake was asked.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from producers import Client
from tests.conftest import FAKE_API_KEY, ROOT, Workers, _fresh, wait_until
from tests.e2e.test_fleet import all_terminal
from tests.fakes import Action, Answer, Error, FakeAnthropic, FakeServer, FakeVLLM, Hang, Invalid
from tierfleet.constants import ROUTE_AUTO, JobStatus, Outcome
from tierfleet.db import Ledger
from tierfleet.fleet import Fleet, load_fleet
from tierfleet.models import Attempt, Job
from tierfleet.prices import PriceBook, Usage
from tierfleet.resources import default_prices_file
from tierfleet.settings import Settings
from tierfleet.transport import make_celery

pytestmark = pytest.mark.e2e

ANTHROPIC_ONLY = ROOT / "examples" / "fleets" / "anthropic-only.toml"
OPENAI_MODEL = "gpt-4o-mini"
OPENAI_KEY = "sk-proj-FAKE-OPENAI-SECRET"
OUTCOME_OF: Mapping[type, Outcome] = {
    Answer: Outcome.SUCCEEDED,
    Invalid: Outcome.INVALID,
    Error: Outcome.ERROR,
    Hang: Outcome.TIMEOUT,
}


# --- the fakes: one per rung ------------------------------------------------------------


@dataclass
class Servers:
    anthropic: list[FakeAnthropic]
    openai: list[FakeVLLM]  # vLLM's server, or any OpenAI-compatible one


@pytest.fixture(scope="module")
def _servers() -> Iterator[Servers]:
    with ExitStack() as stack:
        yield Servers(
            anthropic=[stack.enter_context(FakeAnthropic(api_key=FAKE_API_KEY)) for _ in range(3)],
            openai=[stack.enter_context(FakeVLLM()) for _ in range(2)],
        )


@pytest.fixture
def servers(_servers: Servers) -> Servers:
    for fake in [*_servers.anthropic, *_servers.openai]:
        _fresh(fake)
    return _servers


# --- a ladder: its fleet file, its fakes, its prices --------------------------------------


@dataclass
class Ladder:
    file: Path
    fleet: Fleet
    fakes: dict[str, FakeServer]  # rung -> the fake its pool calls
    prices_file: Path

    @property
    def names(self) -> tuple[str, ...]:
        return self.fleet.names

    @property
    def prices(self) -> PriceBook:
        return PriceBook.load(self.prices_file)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    return repr(value)


def write_ladder(
    path: Path,
    rungs: Sequence[Mapping[str, Any]],
    fakes: Sequence[FakeAnthropic | FakeVLLM],
    prices: Path,
) -> Ladder:
    """A fleet file of `rungs`, each pointed at its own fake."""
    tables = []
    for rung, fake in zip(rungs, fakes, strict=True):
        lines = [f"{k} = {_toml(v)}" for k, v in {**rung, "base_url": fake.base_url}.items()]
        tables.append("[[tier]]\n" + "\n".join(lines) + "\n")
    path.write_text("\n".join(tables))
    fleet = load_fleet(path)
    return Ladder(path, fleet, dict(zip(fleet.names, fakes, strict=True)), prices)


@dataclass
class Pools:
    triage: Workers
    rungs: Workers

    def output(self) -> str:
        return self.triage.output() + self.rungs.output()


@pytest.fixture
def start_ladder(
    settings: Settings,  # the test services' environment, for the client's settings
    ledger: Ledger,
    start_workers: Callable[..., Workers],
) -> Iterator[Callable[..., tuple[Client, Pools]]]:
    """One worker process per pool of the ladder (triage and each rung), and a client."""
    clients: list[Client] = []

    def start(ladder: Ladder, **env: str) -> tuple[Client, Pools]:
        keys = {t.api_key_env: FAKE_API_KEY for t in ladder.fleet if t.backend == "anthropic"}
        env = {
            "TIERFLEET_BACKEND": "real",
            "TIERFLEET_MESSAGE_BATCHES": "off",
            "TIERFLEET_PRICES_FILE": str(ladder.prices_file),
            **{k: v for k, v in keys.items() if k},
            **env,
        }
        workers = Pools(
            triage=start_workers("triage", concurrency=1, fleet=ladder.file, **env),
            rungs=start_workers(*ladder.names, fleet=ladder.file, **env),
        )
        client_settings = Settings.from_env(fleet_file=ladder.file)
        client = Client(client_settings, ledger, make_celery(client_settings))
        clients.append(client)
        return client, workers

    yield start
    for client in clients:
        client.close()


# --- cases: what each rung answers a job, and what the ledger should say -----------------


@dataclass(frozen=True)
class Case:
    """A job and its script: `steps` are (rung, what that rung's fake answers), in the
    order the job should reach them."""

    name: str
    route: str
    steps: tuple[tuple[str, Action], ...]
    max_tokens: int | None = None

    @property
    def marker(self) -> str:
        return f"[case {self.name}]"

    @property
    def expected(self) -> list[tuple[str, Outcome]]:
        return [(tier, OUTCOME_OF[type(action)]) for tier, action in self.steps]

    def envelope(self) -> dict[str, Any]:
        return {
            "feature": "reviews",
            "prompt": f"{self.marker} Sentiment of 'it arrived on time, works fine'",
            "output_schema": "sentiment",
            "route": self.route,
            **({"max_tokens": self.max_tokens} if self.max_tokens else {}),
        }


def on(rung: str, *actions: Action) -> tuple[tuple[str, Action], ...]:
    """Steps: `rung`'s fake answers the job with `actions`, one per call."""
    return tuple((rung, action) for action in actions)


def scripted(name: str, *steps: tuple[str, Action], max_tokens: int | None = None) -> Case:
    """A job routed to its first step's rung."""
    return Case(name, steps[0][0], steps, max_tokens)


def climb(ladder: Ladder, name: str, answered_on: str | None, *, start: int = 0) -> Case:
    """A job started on rung `start` whose every rung answers invalidly up to
    `answered_on` (None: every rung, the top one its `max_attempts` times)."""
    names, top = ladder.names, ladder.fleet.top
    stop = len(names) - 1 if answered_on is None else names.index(answered_on)
    steps: list[tuple[str, Action]] = [(t, Invalid()) for t in names[start:stop]]
    if answered_on is None:
        steps += on(top.name, *[Invalid()] * top.max_attempts)
    else:
        steps.append((answered_on, Answer()))
    return Case(name, names[start], tuple(steps))


@dataclass
class Booked:
    job: Job
    attempts: list[Attempt]

    @property
    def tried(self) -> list[tuple[str, Outcome]]:
        return [(a.tier, a.outcome) for a in self.attempts]


def run(
    client: Client, ledger: Ledger, workers: Pools, ladder: Ladder, cases: Sequence[Case]
) -> dict[str, Booked]:
    """Script each rung's fake, submit the cases, wait until every job is terminal, and
    return each case's job and attempts."""
    for case in cases:
        for tier in dict.fromkeys(t for t, _ in case.steps):
            ladder.fakes[tier].when(case.marker, *(a for t, a in case.steps if t == tier))
    ids = {client.submit(case.envelope()): case.name for case in cases}
    wait_until(
        lambda: all_terminal(ledger, len(ids)),
        timeout_s=90,
        what=f"{len(ids)} terminal jobs\n{workers.output()[-3000:]}",
    )
    with ledger.session() as s:
        jobs = {j.id: j for j in s.execute(select(Job)).scalars()}
        attempts = s.execute(select(Attempt).order_by(Attempt.job_id, Attempt.seq)).scalars()
        booked = {ids[job_id]: Booked(job, []) for job_id, job in jobs.items()}
        for a in attempts:
            booked[ids[a.job_id]].attempts.append(a)
    return booked


def calls(fake: FakeServer, marker: str | None = None) -> int:
    """The API requests `fake` played an action for (whose prompt has `marker`)."""
    return sum(
        1
        for r in fake.requests
        if r.action is not None and (marker is None or marker in fake.prompt_text(r.body))
    )


def assert_booked_once_each(ladder: Ladder, booked: Mapping[str, Booked], workers: Pools) -> None:
    """Every call a fake answered is one attempt, booked on its rung with the rung's model
    and provider, priced from its own tokens; a job's total is its attempts' sum."""
    prices = ladder.prices
    for name, got in booked.items():
        job, attempts = got.job, got.attempts
        assert [a.seq for a in attempts] == list(range(1, len(attempts) + 1)), name
        for a in attempts:
            rung = ladder.fleet.tier(a.tier)
            assert (a.model, a.provider) == (rung.model, rung.backend), name
            usage = Usage(
                input_tokens=a.input_tokens,
                output_tokens=a.output_tokens,
                cache_read_tokens=a.cache_read_tokens,
                cache_write_tokens=a.cache_write_tokens,
            )
            assert a.cost_usd == prices[a.model].cost_usd(usage), (name, a.tier)
            if a.outcome in (Outcome.SUCCEEDED, Outcome.INVALID):  # an answer is never free
                assert a.input_tokens + a.cache_read_tokens + a.cache_write_tokens > 0
                assert a.output_tokens > 0 and a.cost_usd > 0
        assert job.cost_usd == sum(a.cost_usd for a in attempts), name
        for tier, fake in ladder.fakes.items():
            on_tier = sum(1 for a in attempts if a.tier == tier)
            assert calls(fake, f"[case {name}]") == on_tier, (name, tier)
    for tier, fake in ladder.fakes.items():
        on_tier = sum(1 for b in booked.values() for a in b.attempts if a.tier == tier)
        assert calls(fake) == on_tier, tier
        assert {r.body["model"] for r in fake.requests} <= {ladder.fleet.model_for(tier)}
    assert FAKE_API_KEY not in workers.output() and OPENAI_KEY not in workers.output()


# --- the tests ---------------------------------------------------------------------------


def anthropic_only(tmp_path: Path, servers: Servers) -> Ladder:
    """examples/fleets/anthropic-only.toml with each rung on its own fake Anthropic API."""
    rungs = tomllib.loads(ANTHROPIC_ONLY.read_text())["tier"]
    path = tmp_path / "anthropic-only.toml"
    return write_ladder(path, rungs, servers.anthropic, default_prices_file())


def test_an_anthropic_only_ladder_climbs_haiku_sonnet_opus(
    tmp_path: Path,
    servers: Servers,
    ledger: Ledger,
    start_ladder: Callable[..., tuple[Client, Pools]],
) -> None:
    ladder = anthropic_only(tmp_path, servers)
    assert len(ladder.fleet) == 3 and {t.backend for t in ladder.fleet} == {"anthropic"}
    bottom, middle, top = ladder.names
    client, workers = start_ladder(ladder)

    routed = [
        climb(ladder, f"{stop or 'none'}-{i}", stop)
        for stop in (bottom, middle, top, None)
        for i in range(3)
    ]
    # Auto-routed: wherever triage starts them, the bottom rung answers invalidly.
    auto = [Case(f"auto-{i}", ROUTE_AUTO, ((bottom, Invalid()),)) for i in range(6)]
    booked = run(client, ledger, workers, ladder, [*routed, *auto])

    for case in routed:
        job = booked[case.name].job
        assert booked[case.name].tried == case.expected, case.name
        if case.steps[-1][1] == Answer():
            assert job.status is JobStatus.SUCCEEDED, (case.name, job.error)
        else:
            assert job.status is JobStatus.FAILED, case.name
            assert f"{top} answer still invalid after {ladder.fleet.top.max_attempts}" in (
                job.error or ""
            )
    for case in auto:
        got = booked[case.name]
        start = got.attempts[0].tier
        climbed = [(bottom, Outcome.INVALID), (middle, Outcome.SUCCEEDED)]
        assert got.tried == (climbed if start == bottom else [(start, Outcome.SUCCEEDED)])
        assert got.job.status is JobStatus.SUCCEEDED and got.job.triage_reason
    assert_booked_once_each(ladder, booked, workers)


def mixed_ladder(tmp_path: Path, servers: Servers) -> Ladder:
    """vLLM -> an OpenAI-compatible server -> Claude Haiku -> Claude Sonnet. The vLLM
    rung's timeout grows with the answer asked for: 10.4 s for 512 tokens, 0.52 s for 16."""
    rungs: list[dict[str, Any]] = [
        {"name": "llama", "backend": "vllm", "model": "meta-llama/Meta-Llama-3-8B-Instruct",
         "timeout_s": 0.2, "timeout_per_token_s": 0.02},
        {"name": "gpt", "backend": "openai", "model": OPENAI_MODEL,
         "api_key_env": "LADDER_OPENAI_KEY"},
        {"name": "haiku", "backend": "anthropic", "model": "claude-haiku-4-5"},
        {"name": "sonnet", "backend": "anthropic", "model": "claude-sonnet-4-6",
         "max_attempts": 3},
    ]  # fmt: skip
    fakes: list[FakeAnthropic | FakeVLLM] = [*servers.openai, *servers.anthropic[:2]]
    return write_ladder(tmp_path / "mixed.toml", rungs, fakes, default_prices_file())


def test_a_four_rung_mixed_ladder_climbs_and_rides_out_faults(
    tmp_path: Path,
    servers: Servers,
    ledger: Ledger,
    start_ladder: Callable[..., tuple[Client, Pools]],
) -> None:
    ladder = mixed_ladder(tmp_path, servers)
    client, workers = start_ladder(
        ladder, LADDER_OPENAI_KEY=OPENAI_KEY, TIERFLEET_MAX_TRANSIENT_RETRIES="2"
    )
    climbs = [
        climb(ladder, f"{stop or 'none'}-{i}", stop)
        for stop in (*ladder.names, None)
        for i in range(2)
    ]
    busy, overloaded = Error(503), Error(529)
    faults = [
        # a lower rung that does not answer in its timeout: the next rung up
        scripted("hang", *on("llama", Hang(5)), *on("gpt", Answer()), max_tokens=16),
        # a busy or overloaded rung: the same rung again, not an escalation
        scripted("busy", *on("gpt", busy, busy, Answer())),
        scripted("overloaded", *on("haiku", overloaded, Answer())),
        # still down after TIERFLEET_MAX_TRANSIENT_RETRIES retries: the next rung up
        scripted("down", *on("gpt", busy, busy, busy), *on("haiku", Answer())),
        # on the top rung, faults do not use up its max_attempts tries at a valid answer
        scripted("top", *on("sonnet", Invalid(), overloaded, Invalid(), Answer())),
    ]
    booked = run(client, ledger, workers, ladder, [*climbs, *faults])

    for case in [*climbs, *faults]:
        got = booked[case.name]
        assert got.tried == case.expected, (case.name, [a.error for a in got.attempts])
    failed = sorted(name for name, b in booked.items() if b.job.status is JobStatus.FAILED)
    assert failed == ["none-0", "none-1"]  # sonnet, the top, tried its 3 times
    assert "sonnet answer still invalid after 3 attempts" in (booked["none-0"].job.error or "")
    hang = booked["hang"].attempts[0]
    assert hang.cost_usd == 0 and hang.output_tokens == 0
    assert_booked_once_each(ladder, booked, workers)
    # the OpenAI-compatible rung got the key its tier names; vLLM's rung asked for logprobs
    gpt, llama = ladder.fakes["gpt"], ladder.fakes["llama"]
    assert {r.headers["authorization"] for r in gpt.requests} == {f"Bearer {OPENAI_KEY}"}
    assert all(r.body.get("logprobs") for r in llama.requests)
    on_llama = [a for b in booked.values() for a in b.attempts if a.tier == "llama"]
    answered = [a for a in on_llama if a.outcome is not Outcome.TIMEOUT]
    assert answered and all(a.mean_logprob is not None for a in answered)
