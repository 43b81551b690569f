"""Operations on a three-rung ladder (a vLLM rung, then Claude Haiku with Message Batches,
then Claude Sonnet), on the real Redis and Postgres, the real SDKs against the fake
servers: depth and scale show every pool, the report's savings against all-Sonnet equal
a hand computation, a cap on the middle tier holds its jobs while the others run, the
middle rung's provider batches are its own and booked on it, and the reconciler watches
every tier's queue."""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import insert, select, update
from typer.testing import CliRunner

from tests.conftest import StatsdListener, wait_until
from tests.fakes import Invalid
from tests.integration.test_steps import GOOD, script
from tierfleet import constants as C
from tierfleet.cli import app
from tierfleet.constants import JobStatus, Outcome
from tierfleet.db import Ledger
from tierfleet.envelope import parse_envelope
from tierfleet.metrics import Metrics
from tierfleet.models import Attempt, BatchRequest, Job, ProviderBatch
from tierfleet.settings import Settings
from tierfleet.store import insert_job
from tierfleet.transport import make_celery
from workers import depth as queue_depth
from workers import message_batches, scale
from workers.execute import Next, attempt_job, triage_job
from workers.reconcile import reconcile
from workers.runtime import Runtime

pytestmark = pytest.mark.integration
runner = CliRunner()
D = Decimal
LADDER = ("small", "haiku", "sonnet")
# The price file's list prices, per million tokens in / out: Sonnet $3 / $15, Haiku $1 / $5
# (Message Batches at half of every rate, cache writes 1.25x and reads 0.1x the input).
SONNET_IN, SONNET_OUT = D(3), D(15)
HAIKU_BATCH = {"input": D("0.5"), "output": D("2.5"), "cache_write": D("0.625"),
               "cache_read": D("0.05")}  # fmt: skip


def fleet_file(path: Path, vllm_url: str, anthropic_url: str) -> Path:
    path.write_text(
        f"""
[[tier]]
name = "small"
backend = "vllm"
model = "meta-llama/Meta-Llama-3-8B-Instruct"
base_url = "{vllm_url}"
concurrency = 16
replicas_min = 1
replicas_max = 6

[[tier]]
name = "haiku"
backend = "anthropic"
model = "claude-haiku-4-5"
base_url = "{anthropic_url}"
concurrency = 8
replicas_max = 10
batch = true

[[tier]]
name = "sonnet"
backend = "anthropic"
model = "claude-sonnet-4-6"
base_url = "{anthropic_url}"
max_attempts = 2
batch = true
"""
    )
    return path


@pytest.fixture
def ladder(
    settings: Settings,
    ledger: Ledger,
    fake_vllm: Any,
    fake_anthropic: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Runtime]:
    """A runtime on the three-rung ladder; the CLI sees the same fleet file."""
    path = fleet_file(tmp_path / "fleet.toml", fake_vllm.base_url, fake_anthropic.base_url)
    monkeypatch.setenv("TIERFLEET_FLEET_FILE", str(path))
    monkeypatch.setenv("TIERFLEET_BACKEND", "real")
    monkeypatch.setenv("TIERFLEET_MESSAGE_BATCHES", "auto")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    ladder_settings = Settings.from_env(batch_max_wait_s=0.0, retry_base_delay_s=0.0)
    assert ladder_settings.fleet.names == LADDER
    celery = make_celery(ladder_settings)
    rt = Runtime.build(ladder_settings, celery, ledger)
    rt.budgets.refresh_s = 0.0  # a cap set by the CLI is seen at once
    yield rt
    rt.close()
    celery.close()


def new_job(rt: Runtime, **fields: Any) -> str:
    """A job on the ladder's tiers (`route` may name any of them)."""
    envelope = {"feature": "reviews", "prompt": "Sentiment: 'love it'",
                "output_schema": "sentiment", **fields}  # fmt: skip
    spec = parse_envelope(envelope, tiers=rt.settings.fleet.names)
    with rt.ledger.session() as s:
        job_id, _ = insert_job(s, spec)
    return job_id


def _cli(*args: str) -> Any:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


# --- depth and scale ------------------------------------------------------------------------


def _attempts(rt: Runtime, tier: str, n: int, latency_ms: int) -> None:
    job_id = new_job(rt)
    rows = [
        {"id": str(uuid.uuid4()), "job_id": job_id, "seq": i + 1, "tier": tier, "model": "m",
         "provider": "p", "outcome": Outcome.SUCCEEDED, "latency_ms": latency_ms, "cost_usd": 0,
         "feature": "f", "started_at": dt.datetime.now(dt.UTC)}
        for i in range(n)
    ]  # fmt: skip
    with rt.ledger.begin() as conn:
        conn.execute(insert(Attempt), rows)


def test_depth_and_scale_show_every_pool_of_the_ladder(
    ladder: Runtime, redis_url: str, fake_vllm: Any, statsd: StatsdListener
) -> None:
    rt, s = ladder, ladder.settings
    with redis.Redis.from_url(redis_url) as r:
        pipe = r.pipeline()
        for queue, n in (("tier.small", 50), ("tier.haiku", 1000), ("tier.sonnet", 100)):
            for i in range(n):
                pipe.rpush(queue, f"m{i}")
        pipe.rpush("tierfleet.batches.haiku", "b")
        pipe.execute()
    fake_vllm.waiting = 7
    _attempts(rt, "haiku", 10, 2000)  # one haiku worker: 8 in flight / 2 s = 4 jobs/s

    with redis.Redis.from_url(redis_url) as r:
        reading = queue_depth.read(s, rt.ledger, r)
    depth = {q.queue: q.depth for q in reading.queues}
    assert depth == {
        "triage": 0, "tier.small": 50, "tier.haiku": 1000, "tier.sonnet": 100,
        "tierfleet.batches.haiku": 1, "tierfleet.batches.sonnet": 0,
    }  # fmt: skip
    assert [(v.tier, v.waiting, v.error) for v in reading.servers] == [("small", 7.0, None)]

    recs = {x.pool: x for x in scale.recommend(s, rt.ledger, reading)}
    assert list(recs) == ["triage", *LADDER]
    drain = s.scale_drain_s
    # small: never measured, so 16 in flight over its whole timeout (2 s + 0.02 s x 256)
    small_rate = 16 / (2.0 + 0.02 * 256)
    assert recs["small"].per_worker_jobs_per_s == pytest.approx(small_rate, abs=0.01)
    assert recs["small"].replicas == max(1, min(6, math.ceil(50 / (small_rate * drain))))
    # haiku: 1001 messages (its job queue and its batches queue) at 4 jobs/s a worker
    assert recs["haiku"].depth == 1001 and recs["haiku"].per_worker_jobs_per_s == 4.0
    assert recs["haiku"].replicas == min(10, math.ceil(1001 / (4 * drain)))
    # sonnet: 32 in flight (the default) over its 120 s timeout
    assert recs["sonnet"].replicas == math.ceil(100 / (32 / 120 * drain))
    assert (recs["sonnet"].min_replicas, recs["sonnet"].max_replicas) == (0, 20)

    shown = json.loads(_cli("depth", "--json").stdout)
    assert {q["queue"] for q in shown["queues"]} == set(depth)
    assert shown["servers"][0]["tier"] == "small" and shown["vllm"]["waiting"] == 7.0
    pools = {r["pool"]: r["replicas"] for r in json.loads(_cli("scale", "--json").stdout)}
    assert pools == {pool: rec.replicas for pool, rec in recs.items()}

    metrics = Metrics.from_settings(s)
    queue_depth.publish(reading, metrics)
    scale.publish(list(recs.values()), metrics)
    metrics.close()

    def tagged(name: str) -> dict[str, float]:
        return {tags.get("tier", ""): v for n, v, _, tags in statsd.metrics() if n == name}

    wait_until(lambda: "sonnet" in tagged(C.METRIC_REPLICAS_WANTED), timeout_s=5, what="gauges")
    assert tagged(C.METRIC_VLLM_WAITING) == {"small": 7.0}
    assert set(tagged(C.METRIC_QUEUE_DEPTH)) == {"", *LADDER}  # triage has no tier


def test_scale_keda_prints_a_scaled_object_for_every_pool(ladder: Runtime) -> None:
    import yaml

    _attempts(ladder, "haiku", 10, 2000)  # 4 jobs/s a worker
    docs = list(yaml.safe_load_all(_cli("scale", "--keda").stdout))
    by_name = {d["metadata"]["name"]: d["spec"] for d in docs}
    assert list(by_name) == ["tierfleet-triage", "tierfleet-small", "tierfleet-haiku",
                             "tierfleet-sonnet"]  # fmt: skip
    for spec, queue in zip(by_name.values(), ["triage", "tier.small", "tier.haiku", "tier.sonnet"],
                           strict=True):  # fmt: skip
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == queue
    small, haiku = by_name["tierfleet-small"], by_name["tierfleet-haiku"]
    assert (small["minReplicaCount"], small["maxReplicaCount"], small["cooldownPeriod"]) == (
        1,
        6,
        1800,
    )  # the GPU rung stays warm and cools down slowly
    assert (haiku["minReplicaCount"], haiku["maxReplicaCount"]) == (0, 10)
    drain = ladder.settings.scale_drain_s
    assert haiku["triggers"][0]["metadata"]["listLength"] == str(math.ceil(4 * drain))


# --- the report -------------------------------------------------------------------------------


def _seed(ledger: Ledger) -> None:
    """Four jobs across the three rungs (tokens in / out):

    - t1 (tags): small succeeded $0.0001 (1,000 / 100)
    - t2 (tags): small invalid $0.0002 (2,000 / 200), haiku succeeded $0.0030
    - c1 (code): haiku invalid $0.0040 (3,000 / 300), sonnet succeeded $0.0200
    - c2 (code): sonnet succeeded $0.0150 (routed there)
    """
    attempts = [
        ("t1", 1, "small", Outcome.SUCCEEDED, "0.0001", 1000, 100),
        ("t2", 1, "small", Outcome.INVALID, "0.0002", 2000, 200),
        ("t2", 2, "haiku", Outcome.SUCCEEDED, "0.0030", 2000, 150),
        ("c1", 1, "haiku", Outcome.INVALID, "0.0040", 3000, 300),
        ("c1", 2, "sonnet", Outcome.SUCCEEDED, "0.0200", 3000, 400),
        ("c2", 1, "sonnet", Outcome.SUCCEEDED, "0.0150", 2500, 500),
    ]
    now = dt.datetime.now(dt.UTC)
    with ledger.begin() as conn:
        conn.execute(
            insert(Job),
            [{"id": j, "feature": f, "status": JobStatus.SUCCEEDED, "payload": "{}",
              "route": "auto", "latency": "batch", "cost_usd": 0}
             for j, f in (("t1", "tags"), ("t2", "tags"), ("c1", "code"), ("c2", "code"))],
        )  # fmt: skip
        conn.execute(
            insert(Attempt),
            [{"id": str(uuid.uuid4()), "job_id": j, "seq": seq, "tier": tier, "model": tier,
              "provider": "p", "outcome": out, "cost_usd": D(cost), "input_tokens": tin,
              "output_tokens": tout, "latency_ms": 100, "feature": "x", "started_at": now,
              "created_at": now - dt.timedelta(minutes=5)}
             for j, seq, tier, out, cost, tin, tout in attempts],
        )  # fmt: skip


def _at_sonnet(tin: int, tout: int) -> Decimal:
    return (tin * SONNET_IN + tout * SONNET_OUT) / 1_000_000


def test_report_savings_against_all_top_rung_equal_the_hand_computation(
    ladder: Runtime,
) -> None:
    _seed(ladder.ledger)
    rep = json.loads(_cli("report", "--since", "1d", "--json").stdout)
    tags, code, total = rep["groups"]["tags"], rep["groups"]["code"], rep["total"]
    assert rep["ladder"] == list(LADDER) and rep["top_tier"] == "sonnet"
    # t1 and t2 never reached sonnet: their first attempt's tokens at Sonnet's prices
    t1, t2 = _at_sonnet(1000, 100), _at_sonnet(2000, 200)
    assert (t1, t2) == (D("0.0045"), D("0.009"))
    assert D(tags["baseline_usd"]) == t1 + t2 and D(tags["spend_usd"]) == D("0.0033")
    # c1 and c2 reached sonnet: what they cost there
    assert D(code["baseline_usd"]) == D("0.0350") and D(code["spend_usd"]) == D("0.0390")
    assert D(total["spend_usd"]) == D("0.0423")
    assert D(total["baseline_usd"]) == D("0.0485")
    assert D(total["savings_usd"]) == D("0.0062")
    assert total["savings_pct"] == round(float(D("0.0062") / D("0.0485") * 100), 2)
    # escalation: of the three jobs that tried a lower rung, t2 and c1 climbed
    assert total["escalation_rate"] == round(2 / 3, 4)
    assert total["frontier_share"] == 0.25  # c2 alone started on the top rung
    assert total["started_on"] == {"small": 2, "haiku": 1, "sonnet": 1}

    by_tier = json.loads(_cli("report", "--since", "1d", "--by", "tier", "--json").stdout)
    spend = {t: D(g["spend_usd"]) for t, g in by_tier["groups"].items()}
    assert list(spend) == list(LADDER)  # ladder order, cheapest first
    assert spend == {"small": D("0.0003"), "haiku": D("0.0070"), "sonnet": D("0.0350")}

    table = _cli("report", "--since", "1d")
    assert "sonnet share" in table.stdout and "all-sonnet $0.0485" in table.output


# --- budgets -----------------------------------------------------------------------------------


def test_a_cap_on_the_middle_tier_holds_its_jobs_while_the_others_run(ladder: Runtime) -> None:
    rt = ladder
    for tier in LADDER:
        script(rt, tier, GOOD)
    one = rt.prices["claude-haiku-4-5"].cost_usd(GOOD.usage)
    _cli("budgets", "set", "--tier", "haiku", str(one))

    def routed(tier: str, n: int) -> list[str]:
        ids = [new_job(rt, route=tier, prompt=f"Sentiment {tier} {i}") for i in range(n)]
        for job_id in ids:
            assert triage_job(rt, job_id) == Next(tier)
        return ids

    haiku = routed("haiku", 3)
    steps = [attempt_job(rt, job_id, "haiku") for job_id in haiku]
    assert steps[0] is None  # spent the cap
    assert all(step is not None and step.tier == "haiku" and step.delay_s > 0 for step in steps[1:])
    others = routed("small", 2) + routed("sonnet", 2)
    for job_id in others:
        with rt.ledger.session() as s:
            tier = s.get_one(Job, job_id).tier or ""
        assert attempt_job(rt, job_id, tier) is None
    with rt.ledger.session() as s:
        jobs = {j.id: j for j in s.execute(select(Job)).scalars()}
    assert {jobs[i].status for i in others} == {JobStatus.SUCCEEDED}
    assert jobs[haiku[0]].status == JobStatus.SUCCEEDED
    for job_id in haiku[1:]:
        held = jobs[job_id]
        assert held.status == JobStatus.TRIAGED and held.attempt_count == 0
        reason = held.hold_reason or ""
        assert "daily budget of tier 'haiku' is spent" in reason
        assert "budgets set tier:haiku" in reason

    shown = json.loads(_cli("budgets", "--json").stdout)
    (cap,) = shown["budgets"]
    assert (cap["scope"], cap["reached"], shown["jobs_waiting"]) == ("tier:haiku", True, 2)
    unknown = runner.invoke(app, ["budgets", "set", "--tier", "opus", "5"])
    assert unknown.exit_code == 2 and "small, haiku, sonnet" in unknown.output

    _cli("budgets", "set", "tier:haiku", "1000")  # raised: the held jobs go on
    for job_id in haiku[1:]:
        assert attempt_job(rt, job_id, "haiku") is None
    with rt.ledger.session() as s:
        statuses = set(s.execute(select(Job.status).where(Job.id.in_(haiku))).scalars())
    assert statuses == {JobStatus.SUCCEEDED}


# --- Message Batches on the middle rung -------------------------------------------------------


def _hand_priced(usage: dict[str, int]) -> Decimal:
    tokens = {
        "input": usage["input_tokens"], "output": usage["output_tokens"],
        "cache_write": usage.get("cache_creation_input_tokens") or 0,
        "cache_read": usage.get("cache_read_input_tokens") or 0,
    }  # fmt: skip
    total = sum(tokens[k] * HAIKU_BATCH[k] for k in tokens) / Decimal(1_000_000)
    return Decimal(total).quantize(Decimal("0.00000001"))


def test_message_batches_on_the_middle_rung_are_its_own_and_booked_on_it(
    ladder: Runtime, fake_anthropic: Any, statsd: StatsdListener
) -> None:
    rt = ladder
    fake_anthropic.when("review-climbs", Invalid())  # Haiku's answer fails validation once
    sent: list[tuple[str, Next]] = []
    prompts = [f"Sentiment of review {i}: 'fine'" for i in range(5)] + ["review-climbs: 'ok'"]
    ids = []
    for prompt in prompts:
        job_id = new_job(rt, route="haiku", latency="batch", prompt=prompt)
        assert triage_job(rt, job_id) == Next("haiku")
        assert attempt_job(rt, job_id, "haiku") is None  # collected, not called
        ids.append(job_id)
    assert fake_anthropic.requests == []
    with rt.ledger.session() as s:
        assert set(s.execute(select(BatchRequest.tier)).scalars()) == {"haiku"}

    # the top rung's pass leaves the middle rung's requests alone
    assert message_batches.run(rt, lambda _rt, j, step: sent.append((j, step))).submitted == []
    report = message_batches.run(rt, lambda _rt, j, step: sent.append((j, step)), tier="haiku")
    message_batches.run(rt, lambda _rt, j, step: sent.append((j, step)), tier="haiku")
    assert len(report.submitted) == 1
    (haiku_batch,) = list(fake_anthropic.batches)
    assert {r["params"]["model"] for r in fake_anthropic.batches[haiku_batch].requests} == {
        "claude-haiku-4-5"
    }
    # the invalid answer climbs to sonnet, collected there, sent in a batch of its own
    ((climbed, step),) = sent
    assert climbed == ids[-1] and step.tier == "sonnet"
    assert attempt_job(rt, climbed, "sonnet") is None
    message_batches.run(rt, lambda *_: None, tier="sonnet")
    message_batches.run(rt, lambda *_: None, tier="sonnet")

    with rt.ledger.session() as s:
        batches = {b.tier: b for b in s.execute(select(ProviderBatch)).scalars()}
        attempts = list(s.execute(select(Attempt).order_by(Attempt.job_id, Attempt.seq)))
        jobs = {j.id: j for j in s.execute(select(Job).where(Job.id.in_(ids))).scalars()}
    assert set(batches) == {"haiku", "sonnet"}
    assert (batches["haiku"].requests, batches["haiku"].status) == (6, "ingested")
    assert (batches["haiku"].model, batches["sonnet"].requests) == ("claude-haiku-4-5", 1)
    assert {j.status for j in jobs.values()} == {JobStatus.SUCCEEDED}
    usage = {
        line["custom_id"]: line["result"]["message"]["usage"]
        for line in fake_anthropic.batches[haiku_batch].results
    }
    on_haiku = [a for (a,) in attempts if a.tier == "haiku"]
    assert len(on_haiku) == 6 and {a.model for a in on_haiku} == {"claude-haiku-4-5"}
    for a in on_haiku:
        assert a.provider_batch_id == batches["haiku"].id
        assert a.cost_usd == _hand_priced(usage[a.id]) > 0
    assert [(a.tier, a.outcome) for (a,) in attempts if a.job_id == climbed] == [
        ("haiku", Outcome.INVALID), ("sonnet", Outcome.SUCCEEDED)
    ]  # fmt: skip

    listed = json.loads(_cli("batches", "--json").stdout)
    assert {b["tier"] for b in listed["batches"]} == {"haiku", "sonnet"}
    only = json.loads(_cli("batches", "--tier", "haiku", "--json").stdout)
    assert [b["tier"] for b in only["batches"]] == ["haiku"] and only["waiting"] == 0
    bad = runner.invoke(app, ["batches", "--tier", "opus"])
    assert bad.exit_code == 2 and "small, haiku, sonnet" in bad.output

    def batch_tiers() -> set[str]:
        return {
            tags.get("tier", "")
            for name, _, _, tags in statsd.metrics()
            if name == C.METRIC_BATCH_REQUESTS
        }

    rt.metrics.close()
    wait_until(lambda: batch_tiers() == {"haiku", "sonnet"}, timeout_s=5, what="batch metrics")


# --- the reconciler ----------------------------------------------------------------------------


def test_the_reconciler_re_drives_a_lost_job_on_every_tier(ladder: Runtime, redis_url: str) -> None:
    rt = ladder
    lost = {}
    for tier in LADDER:
        job_id = new_job(rt, route=tier)
        assert triage_job(rt, job_id) == Next(tier)  # its message never sent: lost
        lost[job_id] = tier
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    with rt.ledger.begin() as conn:
        conn.execute(update(Job).values(updated_at=long_ago))
    sent: list[tuple[str, str]] = []
    counts = reconcile(rt, lambda _rt, ids: None, lambda _rt, rows: sent.extend(rows))
    assert counts["triaged"] == 3
    assert dict(sent) == lost
