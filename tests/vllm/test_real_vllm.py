"""The small tier against a REAL vLLM: vLLM's CPU build serving a tiny Llama with random
weights (see conftest.py), through tierfleet's own `VLLMBackend`, its worker steps, and its
worker processes, with the fake Anthropic API as the rung above.

Random weights make a model whose every next token is about equally likely. Under
schema-constrained decoding each token it picks keeps the answer valid JSON in the schema,
but JSON allows whitespace almost anywhere, and this model picks whitespace as readily as
anything: an answer ends only when the grammar leaves nothing else to choose. So, greedily
(temperature 0, the fleet's default), a schema of one required enum gives the same short
answer every time, while `sentiment` (an optional number after the label) gives a number
followed by whitespace until `max_tokens`: cut off (finish_reason `length`), and escalated.
Sampled, the answers' lengths vary and the long ones are cut off.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import jsonschema
import pytest
import redis

from tests.conftest import FAKE_API_KEY, ROOT, Workers, wait_until
from tests.e2e.test_fleet import all_terminal, hand_priced
from tests.integration.test_real_backends import run, submit, view
from tests.vllm.conftest import (
    FIGURES,
    MAX_NUM_SEQS,
    SLM_TIMEOUT_BASE_S,
    STARTUP_DEADLINE_S,
    VLLMServer,
)
from tierfleet.constants import JobStatus
from tierfleet.db import Ledger
from tierfleet.envelope import parse_envelope
from tierfleet.settings import Settings
from tierfleet.transport import make_celery
from workers import depth
from workers.backends.vllm import VLLMBackend
from workers.execute import Next
from workers.runtime import Runtime

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(STARTUP_DEADLINE_S + 180)]

SENTIMENT = json.loads((ROOT / "schemas" / "outputs" / "sentiment.json").read_text())
CUT_OFF = "the answer was cut off at max_tokens"
# A label and nothing else: once the label is written, the grammar allows only `}`.
LABEL_ONLY = {
    "type": "object",
    "properties": {"label": SENTIMENT["properties"]["label"]},
    "required": ["label"],
    "additionalProperties": False,
}


def prompt_tokens(server: VLLMServer, messages: list[dict[str, str]]) -> int:
    """What vLLM's own tokenizer and chat template make of `messages`."""
    response = httpx2.post(
        f"{server.root}/tokenize",
        json={"model": server.model, "messages": messages, "add_generation_prompt": True},
        timeout=30,
    )
    response.raise_for_status()
    return int(response.json()["count"])


@pytest.fixture
def backend(vllm_server: VLLMServer) -> Iterator[VLLMBackend]:
    client = VLLMBackend(base_url=vllm_server.base_url, model=vllm_server.model)
    yield client
    client.close()


def test_a_schema_job_is_answered_in_the_schema_with_usage_and_logprobs(
    backend: VLLMBackend, vllm_server: VLLMServer
) -> None:
    job = parse_envelope(
        {"feature": "reviews", "prompt": "Review 1: 'great value'", "output_schema": LABEL_ONLY,
         "max_tokens": 64}
    )  # fmt: skip
    first = backend.complete(job, timeout_s=60)
    jsonschema.validate(json.loads(first.text), LABEL_ONLY)
    assert first.finish_reason == "stop"
    assert first.usage.input_tokens == prompt_tokens(vllm_server, [dict(job.messages[0])])
    assert 0 < first.usage.output_tokens < job.max_tokens
    # token logprobs of the grammar-constrained choice: negative, far above uniform's
    assert (
        first.mean_logprob is not None
        and -math.log(vllm_server.vocab_size) < first.mean_logprob < 0
    )
    # greedy decoding (temperature 0, the default): the same answer again
    assert backend.complete(job, timeout_s=60) == first
    FIGURES["greedy_schema_answer"] = json.dumps(first.text)
    FIGURES["greedy_schema_tokens"] = first.usage.output_tokens


def test_a_greedy_sentiment_answer_pads_its_number_with_whitespace_to_max_tokens(
    backend: VLLMBackend,
) -> None:
    job = parse_envelope(
        {"feature": "reviews", "prompt": "Review 2: 'meh'", "output_schema": "sentiment",
         "max_tokens": 48}
    )  # fmt: skip
    answer = backend.complete(job, timeout_s=60)
    assert (answer.finish_reason, answer.usage.output_tokens) == ("length", 48)
    head = answer.text.rstrip()
    assert head.startswith('{"label":') and '"confidence":' in head and head != answer.text
    FIGURES["greedy_sentiment_answer"] = json.dumps(answer.text[:60])


def test_free_text_from_random_weights_runs_to_max_tokens(
    backend: VLLMBackend, vllm_server: VLLMServer
) -> None:
    job = parse_envelope({"feature": "poems", "prompt": "Write a haiku", "max_tokens": 24})
    answer = backend.complete(job, timeout_s=60)
    assert (answer.finish_reason, answer.usage.output_tokens) == ("length", 24)
    # every token about equally likely: the mean logprob is log(1 / vocabulary size)
    assert answer.mean_logprob == pytest.approx(-math.log(vllm_server.vocab_size), abs=0.05)


@pytest.fixture
def rt(
    settings: Settings,
    ledger: Ledger,
    vllm_server: VLLMServer,
    fake_anthropic: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Runtime]:
    """A worker's runtime on the real server, its settings read from the environment as a
    worker reads them (the ladder is built from them once)."""
    for key, value in {
        "TIERFLEET_BACKEND": "real",
        "VLLM_BASE_URL": vllm_server.base_url,
        "TIERFLEET_SLM_TIMEOUT_BASE_S": str(SLM_TIMEOUT_BASE_S),
        "ANTHROPIC_API_KEY": FAKE_API_KEY,
        "ANTHROPIC_BASE_URL": fake_anthropic.base_url,
    }.items():
        monkeypatch.setenv(key, value)
    real = Settings.from_env()
    assert real.fleet.tier("slm").timeout_s == SLM_TIMEOUT_BASE_S
    runtime = Runtime.build(real, make_celery(real), ledger)
    yield runtime
    runtime.close()
    runtime.celery.close()


def test_an_answer_cut_off_at_max_tokens_climbs_to_the_frontier(
    rt: Runtime, vllm_server: VLLMServer, fake_anthropic: Any
) -> None:
    job_id = submit(rt, "Review 4: 'meh'", output_schema="sentiment", max_tokens=64)
    assert run(rt, job_id) == [Next("slm"), Next("frontier")]
    done = view(rt, job_id)
    assert done.status is JobStatus.SUCCEEDED
    cut, answered = done.attempts
    assert (cut.tier, cut.provider, cut.model, cut.outcome) == (
        "slm", "vllm", vllm_server.model, "invalid"
    )  # fmt: skip
    assert (cut.error, cut.finish_reason, cut.output_tokens) == (CUT_OFF, "length", 64)
    prompt = [{"role": "user", "content": "Review 4: 'meh'"}]
    assert cut.input_tokens == prompt_tokens(vllm_server, prompt)
    assert cut.mean_logprob is not None and cut.mean_logprob < 0
    assert cut.cost_usd == hand_priced(cut.model, cut.input_tokens, cut.output_tokens) > 0
    assert (answered.tier, answered.outcome) == ("frontier", "succeeded")
    assert len(fake_anthropic.requests) == 1


def test_an_answer_that_fits_is_booked_on_the_small_tier(rt: Runtime, fake_anthropic: Any) -> None:
    job_id = submit(rt, "Review 5: 'fine'", output_schema=LABEL_ONLY, max_tokens=64)
    assert run(rt, job_id) == [Next("slm")]
    done = view(rt, job_id)
    assert done.status is JobStatus.SUCCEEDED
    jsonschema.validate(done.result, LABEL_ONLY)
    [attempt] = done.attempts
    assert (attempt.outcome, attempt.finish_reason) == ("succeeded", "stop")
    assert attempt.input_tokens > 0 and 0 < attempt.output_tokens < 64
    assert attempt.mean_logprob is not None and attempt.mean_logprob < 0
    assert done.cost_usd == attempt.cost_usd == hand_priced(
        attempt.model, attempt.input_tokens, attempt.output_tokens
    ) > 0  # fmt: skip
    assert fake_anthropic.requests == []


def test_the_fleet_books_every_answer_and_escalates_the_cut_off_ones(
    client: Any,
    ledger: Ledger,
    fleet_env: dict[str, str],
    vllm_server: VLLMServer,
    fake_anthropic: Any,
    start_workers: Callable[..., Workers],
) -> None:
    env = {
        **fleet_env,
        "TIERFLEET_BACKEND": "real",
        "TIERFLEET_MESSAGE_BATCHES": "off",
        "VLLM_BASE_URL": vllm_server.base_url,
        "TIERFLEET_SLM_TIMEOUT_BASE_S": str(SLM_TIMEOUT_BASE_S),
        "ANTHROPIC_API_KEY": FAKE_API_KEY,
        "ANTHROPIC_BASE_URL": fake_anthropic.base_url,
    }
    workers = start_workers("triage", "slm", "frontier", concurrency=4, **env)

    def reviews(n: int, tag: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            {"feature": "reviews", "prompt": f"Review {tag}{i}: 'ok'", **fields} for i in range(n)
        ]

    kinds = {
        # greedy, a label and nothing else: the short answer, inside max_tokens
        "label-only": reviews(6, "l", output_schema=LABEL_ONLY, max_tokens=64),
        # greedy, sentiment: a number, then whitespace to max_tokens
        "sentiment": reviews(4, "g", output_schema="sentiment", max_tokens=64),
        # sampled, sentiment: as much whitespace as the model happens to pick
        "sampled": reviews(16, "s", output_schema="sentiment", max_tokens=24, temperature=1.0),
    }
    ids = {kind: [client.submit(e) for e in envelopes] for kind, envelopes in kinds.items()}
    total = sum(map(len, ids.values()))
    wait_until(
        lambda: all_terminal(ledger, total),
        timeout_s=240,
        what=f"{total} terminal jobs\n{workers.output()[-3000:]}",
    )

    escalated: Counter[str] = Counter()
    booked = Counter[str]()
    for kind, job_ids in ids.items():
        for job_id in job_ids:
            done = client.get(job_id)
            assert done.status is JobStatus.SUCCEEDED, (done, workers.output()[-3000:])
            first = done.attempts[0]
            assert (first.tier, first.provider, first.model) == ("slm", "vllm", vllm_server.model)
            assert (
                first.input_tokens > 0 and 0 < first.output_tokens <= kinds[kind][0]["max_tokens"]
            )
            assert first.mean_logprob is not None and first.mean_logprob < 0
            assert first.cost_usd == hand_priced(
                first.model, first.input_tokens, first.output_tokens
            )
            booked["prompt_tokens"] += first.input_tokens
            booked["completion_tokens"] += first.output_tokens
            if first.finish_reason == "length":  # cut off: climbed one rung, answered there
                assert (first.outcome, first.error) == ("invalid", CUT_OFF)
                assert first.output_tokens == kinds[kind][0]["max_tokens"]
                assert [(a.tier, a.outcome) for a in done.attempts[1:]] == [
                    ("frontier", "succeeded")
                ]
                escalated[kind] += 1
            else:  # answered on the small tier, in the schema
                assert (first.outcome, first.finish_reason, len(done.attempts)) == (
                    "succeeded",
                    "stop",
                    1,
                )
                schema = kinds[kind][0]["output_schema"]
                jsonschema.validate(done.result, LABEL_ONLY if schema is LABEL_ONLY else SENTIMENT)
    assert escalated["label-only"] == 0 and escalated["sentiment"] == len(ids["sentiment"])
    assert len(fake_anthropic.requests) == sum(escalated.values())
    assert FAKE_API_KEY not in workers.output()
    FIGURES["fleet_jobs"] = total
    FIGURES["fleet_tokens_booked"] = dict(booked)
    FIGURES["fleet_escalated"] = {k: f"{escalated[k]}/{len(v)}" for k, v in ids.items()}


def test_depth_reads_vllms_own_queue(
    settings: Settings,
    ledger: Ledger,
    redis_url: str,
    vllm_server: VLLMServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`tierfleet depth` reads vLLM's own gauges: none at rest; during a burst of three
    times the server's batch, requests in flight there (running within its batch).

    (A sustained load of long answers stalls this CPU server's HTTP side for tens of
    seconds, so the burst is one request per client, and the busy reading is taken with
    the command's own function, in this process.)"""
    monkeypatch.setenv("TIERFLEET_BACKEND", "real")
    monkeypatch.setenv("VLLM_BASE_URL", vllm_server.base_url)
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(ROOT))}
    out = subprocess.run(
        [sys.executable, "-m", "tierfleet", "depth", "--json"],
        env=env, capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    idle = json.loads(out.stdout)
    assert (idle["vllm"], idle["vllm_error"]) == ({"waiting": 0.0, "running": 0.0}, None)

    errors: list[BaseException] = []

    def ask() -> None:
        try:  # a client of its own: the module-level calls here went out one at a time
            with httpx2.Client(timeout=180) as http:
                http.post(
                    f"{vllm_server.base_url}/chat/completions",
                    json={"model": vllm_server.model, "max_tokens": 900, "ignore_eos": True,
                          "messages": [{"role": "user", "content": "Write at length"}]},
                ).raise_for_status()  # fmt: skip
        except BaseException as exc:  # reported below
            errors.append(exc)

    real = Settings.from_env()
    broker = redis.Redis.from_url(redis_url)

    readings: list[dict[str, float]] = []

    def busy() -> dict[str, float] | None:
        reading = depth.read(real, ledger, broker)
        assert reading.vllm_error is None, reading.vllm_error
        gauges = reading.vllm or {}
        readings.append(gauges)
        return gauges if gauges.get("running") or gauges.get("waiting") else None

    def during_a_burst() -> dict[str, float] | None:
        """Polls while one burst is answered; the busy reading, if one was seen."""
        burst = [threading.Thread(target=ask, daemon=True) for _ in range(3 * MAX_NUM_SEQS)]
        for thread in burst:
            thread.start()
        found = None
        while found is None and any(t.is_alive() for t in burst):
            found = busy()
        for thread in burst:
            thread.join(180)
        return found

    # Up to three bursts: on a loaded machine a reading may be held up until one is over.
    seen = next(filter(None, (during_a_burst() for _ in range(3))), None)
    assert seen is not None, f"no depth reading showed vLLM's requests in flight: {readings}"
    assert seen["running"] <= MAX_NUM_SEQS  # vLLM's own batch, not our count of requests
    assert seen["running"] + seen["waiting"] <= 3 * MAX_NUM_SEQS
    assert errors == []
    assert depth.read(real, ledger, broker).vllm == {"waiting": 0.0, "running": 0.0}
    broker.close()
    FIGURES["depth_while_busy"] = seen
