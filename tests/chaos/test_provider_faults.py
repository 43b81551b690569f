"""Provider faults through real worker processes: 429 storms, 529 overloads, calls that
hang past the tier's timeout, malformed response bodies and dropped connections, played by
the fake vLLM and Anthropic servers to the real `openai` and `anthropic` clients.

One fleet (triage, slm and frontier workers, one process each) serves the whole module,
with the retry policy's clocks made small through the environment (`POLICY`). Each test
scripts a few cases, a handful of jobs each; every job has its own marker, so each fake's
requests are counted per job. For every job the test checks:

- the terminal state the README's fault table promises, and a failure reason that names
  the fault;
- exactly as many model requests to each fake as the retry policy allows (one per attempt
  row, the attempts in the order the policy dictates), and the backoff between retries;
- a cost only on attempts that got an answer, priced by hand, and nothing for the others;
- no retry loop: once every job is terminal, the fakes' request counts stay put while a
  probe job goes through the same tiers and the broker drains (checked twice).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from itertools import pairwise

import pytest
import redis
from sqlalchemy import select, text

from producers import Client
from tests.conftest import FAKE_API_KEY, REDIS_URL, ROOT, Workers, wait_until
from tests.e2e.test_fleet import hand_priced
from tests.fakes import (
    Action,
    Answer,
    Drop,
    Error,
    FakeAnthropic,
    FakeServer,
    FakeVLLM,
    Hang,
    Invalid,
    Malformed,
    RecordedRequest,
    Truncated,
)
from tierfleet import constants as C
from tierfleet.constants import TERMINAL_STATUSES, JobStatus, Outcome
from tierfleet.db import Ledger, make_engine
from tierfleet.models import Attempt, Job
from tierfleet.settings import Settings
from tierfleet.transport import make_celery

pytestmark = pytest.mark.chaos

# The retry policy under test (workers/policy.py, from tierfleet/settings.py), small clocks.
MAX_RETRIES = 3  # transient faults retried on one tier: at most MAX_RETRIES + 1 calls
FRONTIER_MAX_ATTEMPTS = 2  # answers the frontier may give before an invalid one fails
BASE_DELAY_S = 0.05  # backoff: 0.05, 0.1, 0.2, 0.2 ...
MAX_DELAY_S = 0.2
TIMEOUT_S = 0.8  # both tiers (no per-token part on the small one)
RETRY_AFTER_S = 0.3  # what the 429s ask for: longer than any backoff here
POLICY = {
    "TIERFLEET_MAX_TRANSIENT_RETRIES": str(MAX_RETRIES),
    "TIERFLEET_FRONTIER_MAX_ATTEMPTS": str(FRONTIER_MAX_ATTEMPTS),
    "TIERFLEET_RETRY_BASE_DELAY_S": str(BASE_DELAY_S),
    "TIERFLEET_RETRY_MAX_DELAY_S": str(MAX_DELAY_S),
    "TIERFLEET_SLM_TIMEOUT_BASE_S": str(TIMEOUT_S),
    "TIERFLEET_SLM_TIMEOUT_PER_TOKEN_S": "0",
    "TIERFLEET_FRONTIER_TIMEOUT_S": str(TIMEOUT_S),
}
JOBS_PER_CASE = 3
WAIT_S = 30.0  # only reached when something is wrong
CLOCK_SLACK_S = 0.01

SLM, FRONTIER = C.TIER_SLM, C.TIER_FRONTIER
PROVIDER = {SLM: "vllm", FRONTIER: "anthropic"}
ANSWERED = {Outcome.SUCCEEDED, Outcome.INVALID, Outcome.LOW_CONFIDENCE}
TRANSIENT = {Outcome.ERROR, Outcome.TIMEOUT}
ANSWER_ACTIONS = (Answer, Invalid, Truncated)  # what the fakes play that is an answer

Trail = tuple[tuple[str, Outcome], ...]


def tries(tier: str, outcome: Outcome, times: int = 1) -> Trail:
    return ((tier, outcome),) * times


@dataclass(frozen=True)
class Case:
    """`JOBS_PER_CASE` jobs scripted alike (each under its own marker), and what must
    become of each: its attempts as (tier, outcome) in order (one model request each),
    its terminal status and, for a failed job, words its error must contain."""

    name: str
    route: str
    trail: Trail
    status: JobStatus
    reason: str = ""
    slm: tuple[Action, ...] = ()  # what the fake vLLM plays to each job, in order
    frontier: tuple[Action, ...] = ()  # and the fake Anthropic API
    retry_after_s: float | None = None  # what the script's faults ask for


@dataclass
class Fleet:
    client: Client
    ledger: Ledger
    broker: redis.Redis
    workers: Workers

    @property
    def job_queues(self) -> set[str]:
        s = self.client.settings
        return {s.queue_triage, s.queue_slm, s.queue_frontier}

    def broker_idle(self) -> bool:
        """No job message anywhere in Redis: none queued, none delivered and unacked (a
        retry waiting out its countdown is held unacked by the worker that took it)."""
        if any(self.broker.llen(queue) for queue in self.job_queues):
            return False
        for raw in self.broker.hvals(C.REDIS_UNACKED):
            _message, _exchange, routing_key = json.loads(raw)
            if routing_key in self.job_queues:
                return False
        return True


# --- the fleet ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(
    pg_database: str,
    _fake_vllm: FakeVLLM,
    _fake_anthropic: FakeAnthropic,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fleet]:
    """Worker processes for the module (one per pool) on the real backends pointed at the
    fakes, a clean ledger and Redis db, and a client. Tests tell their jobs apart by id."""
    broker = redis.Redis.from_url(REDIS_URL)
    try:
        broker.flushdb()
    except redis.RedisError as exc:
        message = f"Redis is not reachable ({exc}); run `make services` or see README"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    engine = make_engine(pg_database)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE attempts, jobs, batches, dead_letters CASCADE"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERFLEET_", "DD_"))}
    env.update(
        REDIS_URL=REDIS_URL,
        DATABASE_URL=pg_database,
        TIERFLEET_BACKEND="real",
        VLLM_BASE_URL=_fake_vllm.base_url,
        ANTHROPIC_API_KEY=FAKE_API_KEY,
        ANTHROPIC_BASE_URL=_fake_anthropic.base_url,
        **POLICY,
    )
    log = tmp_path_factory.mktemp("chaos") / "workers.log"
    handle = log.open("wb")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tierfleet", "worker", "--pool", pool, "--concurrency", n],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        for pool, n in (("triage", "2"), ("slm", "16"), ("frontier", "16"))
    ]
    workers = Workers(procs, log, handle)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            if key.startswith("TIERFLEET_") or key in ("REDIS_URL", "DATABASE_URL"):
                patch.setenv(key, value)
        settings = Settings.from_env()
    # the policy the workers run is the one the expectations below are computed from
    assert (
        settings.max_transient_retries,
        settings.frontier_max_attempts,
        settings.retry_base_delay_s,
        settings.retry_max_delay_s,
        settings.slm_timeout_s(64),
        settings.frontier_timeout_s,
    ) == (MAX_RETRIES, FRONTIER_MAX_ATTEMPTS, BASE_DELAY_S, MAX_DELAY_S, TIMEOUT_S, TIMEOUT_S)
    ledger = Ledger(engine)
    client = Client(settings, ledger, make_celery(settings))
    try:
        yield Fleet(client, ledger, broker, workers)
    finally:
        workers.stop()
        client.close()
        broker.flushdb()
        broker.close()


# --- running cases --------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """What became of one job: the ledger's view and the requests each fake received."""

    case: Case
    job: Job
    attempts: list[Attempt]
    requests: dict[str, list[RecordedRequest]]  # tier -> its fake's requests for this job


def run_cases(
    fleet: Fleet, fakes: dict[str, FakeServer], label: str, cases: Sequence[Case]
) -> list[Seen]:
    """Script the fakes, submit every case's jobs at once, wait until all are terminal,
    check each job against its case, then that nothing asks the fakes for more."""
    running = [p.poll() is None for p in fleet.workers.procs]
    assert all(running), f"a worker exited:\n{fleet.workers.output()[-4000:]}"
    submitted: dict[str, tuple[Case, str]] = {}
    for case in cases:
        for i in range(JOBS_PER_CASE):
            marker = f"[{label}:{case.name}:{i}]"
            if case.slm:
                fakes[SLM].when(marker, *case.slm)
            if case.frontier:
                fakes[FRONTIER].when(marker, *case.frontier)
            job_id = fleet.client.submit(
                {
                    "feature": f"chaos-{label}",
                    "prompt": f"{marker} Sentiment of the review 'late, but works fine'",
                    "output_schema": "sentiment",
                    "max_tokens": 64,
                    "route": case.route,
                }
            )
            submitted[job_id] = (case, marker)
    ids = list(submitted)
    log_from = len(fleet.workers.output())
    try:
        wait_until(
            lambda: len(_terminal(fleet.ledger, ids)) == len(ids),
            timeout_s=WAIT_S,
            what=f"{len(ids)} terminal jobs",
        )
    except pytest.fail.Exception:
        done = set(_terminal(fleet.ledger, ids))
        stuck = sorted({submitted[i][0].name for i in ids if i not in done})
        output = fleet.workers.output()[log_from:]
        pytest.fail(f"jobs of {stuck} never ended; the workers said:\n{output[-6000:]}")
    seen = _observe(fleet, fakes, submitted)
    for one in seen:
        check_job(one)
    assert_no_more_requests(fleet, fakes, label, submitted, seen)
    # every fault was an outcome the policy decided on, not an exception in a worker
    output = fleet.workers.output()[log_from:]
    assert "Traceback" not in output, output[-4000:]
    _report(label, cases, seen)
    return seen


def _terminal(ledger: Ledger, ids: list[str]) -> list[str]:
    with ledger.session() as s:
        query = select(Job.id).where(Job.id.in_(ids), Job.status.in_(list(TERMINAL_STATUSES)))
        return list(s.execute(query).scalars())


def _observe(
    fleet: Fleet, fakes: dict[str, FakeServer], submitted: dict[str, tuple[Case, str]]
) -> list[Seen]:
    with fleet.ledger.session() as s:
        jobs = {j.id: j for j in s.execute(select(Job).where(Job.id.in_(submitted))).scalars()}
        query = select(Attempt).where(Attempt.job_id.in_(submitted)).order_by(Attempt.seq)
        attempts: dict[str, list[Attempt]] = {job_id: [] for job_id in submitted}
        for attempt in s.execute(query).scalars():
            attempts[attempt.job_id].append(attempt)
    return [
        Seen(
            case,
            jobs[job_id],
            attempts[job_id],
            {tier: requests_for(fake, marker) for tier, fake in fakes.items()},
        )
        for job_id, (case, marker) in submitted.items()
    ]


def requests_for(fake: FakeServer, marker: str) -> list[RecordedRequest]:
    """The requests `fake` received whose prompt carries `marker`."""
    recorded = list(fake.requests)
    return [r for r in recorded if isinstance(r.body, dict) and marker in fake.prompt_text(r.body)]


def check_job(seen: Seen) -> None:
    case, job, attempts = seen.case, seen.job, seen.attempts
    where = f"{case.name} job {job.id}: {job.status} {job.error!r}"
    # the state the fault table promises, and the fault named when the job failed
    assert job.status == case.status, where
    if case.status is JobStatus.FAILED:
        assert job.error and case.reason in job.error, where
        assert job.result is None, where
    else:
        assert job.error is None and isinstance(job.result, dict), where
        assert job.result["label"] in {"positive", "negative", "neutral", "mixed"}, where
    # the policy's exact sequence of attempts, and one model request behind each
    assert [(a.tier, Outcome(a.outcome)) for a in attempts] == list(case.trail), where
    for tier in (SLM, FRONTIER):
        expected = sum(1 for t, _ in case.trail if t == tier)
        assert len(seen.requests[tier]) == expected, f"{where}: {tier} requests"
        mine = [a for a in attempts if a.tier == tier]
        assert all(a.provider == PROVIDER[tier] for a in mine), where
    # billed only for answers: a fault costs nothing, an answer its tokens at list price
    for a in attempts:
        if a.outcome in ANSWERED:
            assert a.input_tokens > 0 and a.output_tokens > 0, where
            assert a.cost_usd > 0, where
            assert a.cost_usd == hand_priced(
                a.model, a.input_tokens, a.output_tokens, a.cache_write_tokens, a.cache_read_tokens
            ), where
        else:
            tokens = (a.input_tokens, a.output_tokens, a.cache_read_tokens, a.cache_write_tokens)
            assert tokens == (0, 0, 0, 0) and a.cost_usd == 0, f"{where}: attempt {a.seq}"
            assert a.error, where
    assert job.cost_usd == sum((a.cost_usd for a in attempts), Decimal(0)), where
    answers = sum(
        1
        for requests in seen.requests.values()
        for r in requests
        if isinstance(r.action, ANSWER_ACTIONS)
    )
    assert billed(seen) == answers, f"{where}: billed attempts vs answers the fakes gave"
    # each retry of a fault waited its backoff (or the retry-after, when longer)
    retries_on: Counter[str] = Counter()
    for before, after in pairwise(attempts):
        if before.outcome not in TRANSIENT:
            continue
        wait = min(MAX_DELAY_S, BASE_DELAY_S * 2 ** retries_on[before.tier])
        wait = max(wait, case.retry_after_s or 0.0)
        retries_on[before.tier] += 1
        if after.tier == before.tier:
            gap = (after.started_at - before.started_at).total_seconds()
            assert gap >= wait - CLOCK_SLACK_S, f"{where}: retry {after.seq} after {gap:.3f}s"


def billed(seen: Seen) -> int:
    return sum(1 for a in seen.attempts if a.cost_usd > 0)


def assert_no_more_requests(
    fleet: Fleet,
    fakes: dict[str, FakeServer],
    label: str,
    submitted: dict[str, tuple[Case, str]],
    seen: list[Seen],
) -> None:
    """Every job is terminal; its requests must stop there. Counted once now, and again
    after a probe job has gone through both tiers and Redis holds no job message at all
    (nothing queued, no retry waiting out a countdown)."""

    def counts(current: list[Seen]) -> list[tuple[JobStatus, int, int, int]]:
        return [
            (s.job.status, len(s.attempts), len(s.requests[SLM]), len(s.requests[FRONTIER]))
            for s in current
        ]

    first = counts(seen)
    probes = [
        fleet.client.submit(
            {"feature": "chaos-probe", "prompt": f"[probe {label} {tier}] Say hello", "route": tier}
        )
        for tier in (SLM, FRONTIER)
    ]

    def settled() -> bool:
        with fleet.ledger.session() as s:
            query = select(Job.status).where(Job.id.in_(probes))
            done = list(s.execute(query).scalars())
        return done == [JobStatus.SUCCEEDED] * 2 and fleet.broker_idle()

    wait_until(settled, timeout_s=WAIT_S, what="the probe jobs and an idle broker")
    assert counts(_observe(fleet, fakes, submitted)) == first
    for fake in fakes.values():  # no call left hanging either: the clients hung up
        wait_until(lambda fake=fake: fake.in_flight == 0, timeout_s=5, what=f"{fake.name} idle")


def _report(label: str, cases: Sequence[Case], seen: list[Seen]) -> None:
    """One line per case (shown with -rP or -s): the figures behind the assertions."""
    for case in cases:
        mine = [s for s in seen if s.case is case]
        states = Counter(s.job.status.value for s in mine)
        print(
            f"{label}/{case.name}: jobs={len(mine)}"
            f" vllm_requests={sum(len(s.requests[SLM]) for s in mine)}"
            f" anthropic_requests={sum(len(s.requests[FRONTIER]) for s in mine)}"
            f" attempts={sum(len(s.attempts) for s in mine)}"
            f" billed={sum(billed(s) for s in mine)}"
            f" states={dict(states)}"
        )


@pytest.fixture
def fakes(fake_vllm: FakeVLLM, fake_anthropic: FakeAnthropic) -> dict[str, FakeServer]:
    """Both fakes, reset for the test, by the tier they serve."""
    return {SLM: fake_vllm, FRONTIER: fake_anthropic}


def still_failing(reason: str) -> str:
    return f"frontier still failing after {MAX_RETRIES} retries: {reason}"


NEVER = MAX_RETRIES + 3  # a fault scripted this often outlasts the retry budget


# --- the faults ----------------------------------------------------------------------------


def test_a_429_storm_is_waited_out_within_the_retry_budget(
    fleet: Fleet, fakes: dict[str, FakeServer]
) -> None:
    """Every job of the test is in the storm, so for the first MAX_RETRIES rounds every
    request a tier gets is a 429 asking to wait RETRY_AFTER_S (longer than the backoff)."""
    storm = Error(429, message="rate limit exceeded", retry_after_s=RETRY_AFTER_S)
    r = MAX_RETRIES
    cases = [
        Case(
            "frontier-passes",
            FRONTIER,
            frontier=(storm,) * r,
            trail=tries(FRONTIER, Outcome.ERROR, r) + tries(FRONTIER, Outcome.SUCCEEDED),
            status=JobStatus.SUCCEEDED,
            retry_after_s=RETRY_AFTER_S,
        ),
        Case(
            "frontier-never-passes",
            FRONTIER,
            frontier=(storm,) * NEVER,
            trail=tries(FRONTIER, Outcome.ERROR, r + 1),
            status=JobStatus.FAILED,
            reason=still_failing("anthropic 429: rate limit exceeded"),
            retry_after_s=RETRY_AFTER_S,
        ),
        Case(
            "slm-passes",
            SLM,
            slm=(storm,) * r,
            trail=tries(SLM, Outcome.ERROR, r) + tries(SLM, Outcome.SUCCEEDED),
            status=JobStatus.SUCCEEDED,
            retry_after_s=RETRY_AFTER_S,
        ),
        Case(
            "slm-never-passes-escalates",
            SLM,
            slm=(storm,) * NEVER,
            trail=tries(SLM, Outcome.ERROR, r + 1) + tries(FRONTIER, Outcome.SUCCEEDED),
            status=JobStatus.SUCCEEDED,
            retry_after_s=RETRY_AFTER_S,
        ),
        Case(
            "both-tiers-never-pass",
            SLM,
            slm=(storm,) * NEVER,
            frontier=(storm,) * NEVER,
            trail=tries(SLM, Outcome.ERROR, r + 1) + tries(FRONTIER, Outcome.ERROR, r + 1),
            status=JobStatus.FAILED,
            reason=still_failing("anthropic 429: rate limit exceeded"),
            retry_after_s=RETRY_AFTER_S,
        ),
    ]
    seen = run_cases(fleet, fakes, "429", cases)
    # the storm spared no request: a job's first MAX_RETRIES calls to a tier in the storm
    # were all 429s, and only then did an answer (or the escalation) come
    for one in seen:
        for tier, script in ((SLM, one.case.slm), (FRONTIER, one.case.frontier)):
            if script:
                played = [r.action for r in one.requests[tier]]
                assert played[:MAX_RETRIES] == [storm] * MAX_RETRIES


def test_anthropic_529_overloaded_is_retried_then_fails_the_job(
    fleet: Fleet, fakes: dict[str, FakeServer]
) -> None:
    overloaded = Error(529, message="Overloaded")
    r = MAX_RETRIES
    cases = [
        Case(
            "passes",
            FRONTIER,
            frontier=(overloaded,) * r,
            trail=tries(FRONTIER, Outcome.ERROR, r) + tries(FRONTIER, Outcome.SUCCEEDED),
            status=JobStatus.SUCCEEDED,
        ),
        Case(
            "never-passes",
            FRONTIER,
            frontier=(overloaded,) * NEVER,
            trail=tries(FRONTIER, Outcome.ERROR, r + 1),
            status=JobStatus.FAILED,
            reason=still_failing("anthropic 529: Overloaded"),
        ),
        # an invalid small answer is an answer (billed), then the frontier never answers
        Case(
            "escalated-into-overload",
            SLM,
            slm=(Invalid(),),
            frontier=(overloaded,) * NEVER,
            trail=tries(SLM, Outcome.INVALID) + tries(FRONTIER, Outcome.ERROR, r + 1),
            status=JobStatus.FAILED,
            reason=still_failing("anthropic 529: Overloaded"),
        ),
    ]
    seen = run_cases(fleet, fakes, "529", cases)
    assert {billed(s) for s in seen if s.case.name == "escalated-into-overload"} == {1}


def test_calls_that_hang_past_the_timeout(fleet: Fleet, fakes: dict[str, FakeServer]) -> None:
    hang = Hang(30.0)  # far past TIMEOUT_S: only the client's timeout ends it
    r = MAX_RETRIES
    timed_out = f"anthropic did not answer within {TIMEOUT_S:.1f}s"
    cases = [
        # a small-tier timeout escalates at once: it is not retried on the small tier
        Case(
            "slm-escalates",
            SLM,
            slm=(hang,) * NEVER,
            trail=tries(SLM, Outcome.TIMEOUT) + tries(FRONTIER, Outcome.SUCCEEDED),
            status=JobStatus.SUCCEEDED,
        ),
        Case(
            "frontier-passes",
            FRONTIER,
            frontier=(hang,) * r,
            trail=tries(FRONTIER, Outcome.TIMEOUT, r) + tries(FRONTIER, Outcome.SUCCEEDED),
            status=JobStatus.SUCCEEDED,
        ),
        Case(
            "both-never-pass",
            SLM,
            slm=(hang,) * NEVER,
            frontier=(hang,) * NEVER,
            trail=tries(SLM, Outcome.TIMEOUT) + tries(FRONTIER, Outcome.TIMEOUT, r + 1),
            status=JobStatus.FAILED,
            reason=still_failing(timed_out),
        ),
    ]
    seen = run_cases(fleet, fakes, "timeout", cases)
    for one in seen:
        for a in one.attempts:
            if a.outcome == Outcome.TIMEOUT:  # given up at the timeout, not before or long after
                assert TIMEOUT_S * 1000 - 5 <= a.latency_ms < TIMEOUT_S * 1000 + 2000, a.latency_ms


def test_malformed_response_bodies(fleet: Fleet, fakes: dict[str, FakeServer]) -> None:
    r = MAX_RETRIES
    malformed = "sent a malformed response"
    html = Malformed(text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")
    cases = [
        Case(  # HTTP 200, the body cut off halfway: not JSON
            "frontier-cut-body-passes",
            FRONTIER,
            frontier=(Malformed(),) * r,
            trail=tries(FRONTIER, Outcome.ERROR, r) + tries(FRONTIER, Outcome.SUCCEEDED),
            status=JobStatus.SUCCEEDED,
        ),
        Case(  # JSON without the usage every message carries
            "frontier-no-usage-never-passes",
            FRONTIER,
            frontier=(Malformed(drop=("usage",)),) * NEVER,
            trail=tries(FRONTIER, Outcome.ERROR, r + 1),
            status=JobStatus.FAILED,
            reason=still_failing(f"anthropic {malformed}"),
        ),
        Case(  # JSON with a usage that lacks a required count
            "frontier-no-input-tokens-never-passes",
            FRONTIER,
            frontier=(Malformed(drop=("usage.input_tokens",)),) * NEVER,
            trail=tries(FRONTIER, Outcome.ERROR, r + 1),
            status=JobStatus.FAILED,
            reason=still_failing(f"anthropic {malformed}"),
        ),
        Case(  # an HTML page where JSON was expected
            "slm-html-passes",
            SLM,
            slm=(html,) * r,
            trail=tries(SLM, Outcome.ERROR, r) + tries(SLM, Outcome.SUCCEEDED),
            status=JobStatus.SUCCEEDED,
        ),
        Case(  # a completion without choices, every time: the frontier takes the job
            "slm-no-choices-escalates",
            SLM,
            slm=(Malformed(drop=("choices",)),) * NEVER,
            trail=tries(SLM, Outcome.ERROR, r + 1) + tries(FRONTIER, Outcome.SUCCEEDED),
            status=JobStatus.SUCCEEDED,
        ),
        Case(  # a malformed body is no answer: only the invalid answers count to the limit
            "frontier-malformed-and-invalid",
            FRONTIER,
            frontier=(Malformed(), Invalid()) * FRONTIER_MAX_ATTEMPTS + (Answer(),),
            trail=tries(FRONTIER, Outcome.ERROR)
            + tries(FRONTIER, Outcome.INVALID)
            + tries(FRONTIER, Outcome.ERROR)
            + tries(FRONTIER, Outcome.INVALID),
            status=JobStatus.FAILED,
            reason=f"frontier answer still invalid after {FRONTIER_MAX_ATTEMPTS} attempts",
        ),
    ]
    seen = run_cases(fleet, fakes, "malformed", cases)
    for one in seen:
        for a in one.attempts:
            if a.outcome == Outcome.ERROR:
                assert malformed in (a.error or ""), a.error


def test_dropped_connections(fleet: Fleet, fakes: dict[str, FakeServer]) -> None:
    r = MAX_RETRIES
    cases = [
        Case(
            "slm-passes",
            SLM,
            slm=(Drop(),) * r,
            trail=tries(SLM, Outcome.ERROR, r) + tries(SLM, Outcome.SUCCEEDED),
            status=JobStatus.SUCCEEDED,
        ),
        Case(
            "frontier-passes",
            FRONTIER,
            frontier=(Drop(),) * r,
            trail=tries(FRONTIER, Outcome.ERROR, r) + tries(FRONTIER, Outcome.SUCCEEDED),
            status=JobStatus.SUCCEEDED,
        ),
        Case(
            "both-never-pass",
            SLM,
            slm=(Drop(),) * NEVER,
            frontier=(Drop(),) * NEVER,
            trail=tries(SLM, Outcome.ERROR, r + 1) + tries(FRONTIER, Outcome.ERROR, r + 1),
            status=JobStatus.FAILED,
            reason=still_failing("anthropic connection failed"),
        ),
    ]
    run_cases(fleet, fakes, "drop", cases)
