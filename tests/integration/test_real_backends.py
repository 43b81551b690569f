"""The vLLM and Claude backends through the real `openai` and `anthropic` clients, against
the fake servers on loopback, one worker step at a time on the real Postgres."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from tests.conftest import FAKE_API_KEY
from tests.fakes import Answer, Drop, Error, Hang, Invalid
from tierfleet.constants import JobStatus
from tierfleet.db import Ledger
from tierfleet.envelope import parse_envelope
from tierfleet.settings import Settings
from tierfleet.store import JobView, get_job, insert_job
from tierfleet.transport import make_celery
from workers.backends.vllm import read_vllm_metrics
from workers.execute import Next, attempt_job, triage_job
from workers.runtime import Runtime

pytestmark = pytest.mark.integration


@pytest.fixture
def real_settings(settings: Settings, fake_vllm: Any, fake_anthropic: Any) -> Settings:
    return settings.model_copy(
        update={
            "backend": "real",
            "vllm_base_url": fake_vllm.base_url,
            "anthropic_api_key": FAKE_API_KEY,
            "anthropic_base_url": fake_anthropic.base_url,
            "retry_base_delay_s": 0.5,
            "retry_max_delay_s": 4.0,
            "max_transient_retries": 3,
        }
    )


def make_runtime(settings: Settings, ledger: Ledger, **changes: Any) -> Runtime:
    from pydantic import SecretStr

    update = {"anthropic_api_key": SecretStr(FAKE_API_KEY), **changes}
    return Runtime.build(settings.model_copy(update=update), make_celery(settings), ledger)


@pytest.fixture
def rt(real_settings: Settings, ledger: Ledger) -> Iterator[Runtime]:
    runtime = make_runtime(real_settings, ledger)
    yield runtime
    runtime.close()
    runtime.celery.close()


def submit(rt: Runtime, prompt: str, **fields: Any) -> str:
    spec = parse_envelope({"feature": "reviews", "prompt": prompt, **fields})
    with rt.ledger.session() as s:
        job_id, _ = insert_job(s, spec)
    return job_id


def view(rt: Runtime, job_id: str) -> JobView:
    with rt.ledger.session() as s:
        return get_job(s, job_id)


def run(rt: Runtime, job_id: str) -> list[Next]:
    """Triage, then every attempt the job asks for, as the workers would (delays skipped)."""
    steps: list[Next] = []
    step = triage_job(rt, job_id)
    while step is not None:
        steps.append(step)
        step = attempt_job(rt, job_id, step.tier)
    return steps


def usd(tokens: int, per_mtok: str) -> Decimal:
    return tokens * Decimal(per_mtok) / 1_000_000


def sonnet_by_hand(a: Any) -> Decimal:
    """$3 in, $15 out, cache writes at 1.25x input, cache reads at 0.1x, per million."""
    return (
        usd(a.input_tokens, "3")
        + usd(a.output_tokens, "15")
        + usd(a.cache_write_tokens, "3.75")
        + usd(a.cache_read_tokens, "0.30")
    ).quantize(Decimal("1e-8"))


def test_a_small_model_answer_is_schema_constrained_and_priced_from_gpu_hours(
    rt: Runtime, fake_vllm: Any, fake_anthropic: Any
) -> None:
    job_id = submit(rt, "Review 1: 'great value'", output_schema="sentiment", max_tokens=64)
    assert run(rt, job_id) == [Next("slm")]

    done = view(rt, job_id)
    assert done.status is JobStatus.SUCCEEDED and done.result["label"] in {
        "positive",
        "negative",
        "neutral",
        "mixed",
    }
    [attempt] = done.attempts
    assert (attempt.provider, attempt.model) == ("vllm", "meta-llama/Meta-Llama-3-8B-Instruct")
    assert attempt.mean_logprob == pytest.approx(-0.1)  # the fake's token logprobs average
    [request] = fake_vllm.requests
    body = request.body
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["required"] == ["label"]
    assert body["logprobs"] is True and body["max_tokens"] == 64
    assert fake_anthropic.requests == []
    # $1.006/h over (10,000 prompt | 1,000 generated) tokens/s at 60% utilisation
    per_in = Decimal("1.006") / (10_000 * 3600 * Decimal("0.6"))
    per_out = Decimal("1.006") / (1_000 * 3600 * Decimal("0.6"))
    expected = attempt.input_tokens * per_in + attempt.output_tokens * per_out
    assert attempt.cost_usd == expected.quantize(Decimal("1e-8")) > 0


def test_an_invalid_small_answer_escalates_and_claude_answers_with_tool_use(
    rt: Runtime, fake_vllm: Any, fake_anthropic: Any
) -> None:
    fake_vllm.when("Review 2", Invalid())
    job_id = submit(rt, "Review 2: 'meh'", output_schema="sentiment", system="Label it.")
    assert run(rt, job_id) == [Next("slm"), Next("frontier")]

    done = view(rt, job_id)
    assert done.status is JobStatus.SUCCEEDED and "label" in done.result
    assert [(a.tier, a.outcome, a.provider) for a in done.attempts] == [
        ("slm", "invalid", "vllm"),
        ("frontier", "succeeded", "anthropic"),
    ]
    [request] = fake_anthropic.requests
    assert request.body["tool_choice"] == {"type": "tool", "name": "sentiment"}
    assert request.body["system"][0]["cache_control"] == {"type": "ephemeral"}
    assert FAKE_API_KEY in request.headers.get("authorization", "") + request.headers.get(
        "x-api-key", ""
    )


def test_a_low_confidence_small_answer_escalates(
    real_settings: Settings, ledger: Ledger, fake_vllm: Any
) -> None:
    rt = make_runtime(real_settings, ledger, min_mean_logprob=-1.0)
    fake_vllm.when("Review 3", Answer(mean_logprob=-2.5))
    job_id = submit(rt, "Review 3: 'hmm'", output_schema="sentiment")
    run(rt, job_id)
    first = view(rt, job_id).attempts[0]
    assert first.outcome == "low_confidence" and "-2.500" in (first.error or "")
    rt.close()


def test_a_small_tier_timeout_escalates_and_does_not_loop(
    real_settings: Settings, ledger: Ledger, fake_vllm: Any
) -> None:
    rt = make_runtime(real_settings, ledger, slm_timeout_base_s=0.3, slm_timeout_per_token_s=0.0)
    fake_vllm.when("Review 4", Hang(5.0))
    job_id = submit(rt, "Review 4: 'slow'", output_schema="sentiment")
    assert run(rt, job_id) == [Next("slm"), Next("frontier")]
    done = view(rt, job_id)
    assert [(a.tier, a.outcome) for a in done.attempts] == [
        ("slm", "timeout"),
        ("frontier", "succeeded"),
    ]
    assert "did not answer within 0.3s" in (done.attempts[0].error or "")
    assert len(fake_vllm.requests) == 1
    rt.close()


def test_a_429_then_success_is_retried_after_retry_after_and_billed_once(
    rt: Runtime, fake_anthropic: Any
) -> None:
    fake_anthropic.when("Review 5", Error(429, retry_after_s=1.5), Answer())
    job_id = submit(rt, "Review 5: 'fine'", route="frontier", output_schema="sentiment")
    assert run(rt, job_id) == [Next("frontier"), Next("frontier", 1.5)]

    done = view(rt, job_id)
    assert (done.attempts[0].outcome, done.attempts[0].cost_usd) == ("error", Decimal(0))
    assert "429" in (done.attempts[0].error or "")
    paid = done.attempts[1]
    assert paid.outcome == "succeeded"
    assert done.cost_usd == paid.cost_usd == sonnet_by_hand(paid) > 0
    assert len(fake_anthropic.requests) == 2  # the SDK itself retried nothing


def test_a_529_storm_is_retried_with_bounded_backoff_then_fails(
    rt: Runtime, fake_anthropic: Any
) -> None:
    fake_anthropic.when("Review 6", *[Error(529)] * 10)
    job_id = submit(rt, "Review 6: 'busy'", route="frontier")
    steps = run(rt, job_id)
    assert steps == [
        Next("frontier"),
        Next("frontier", 0.5),
        Next("frontier", 1.0),
        Next("frontier", 2.0),
    ]
    done = view(rt, job_id)
    assert done.status is JobStatus.FAILED
    assert done.error and "still failing after 3 retries" in done.error and "529" in done.error
    assert len(fake_anthropic.requests) == 4 and done.cost_usd == 0


def test_a_400_fails_the_job_with_the_providers_message(rt: Runtime, fake_anthropic: Any) -> None:
    message = "prompt is too long: 212000 tokens > 200000 maximum"
    fake_anthropic.when("Review 7", Error(400, message=message))
    job_id = submit(rt, "Review 7: 'long'", route="frontier")
    run(rt, job_id)
    done = view(rt, job_id)
    assert done.status is JobStatus.FAILED
    assert done.error == f"frontier rejected the request: anthropic 400: {message}"
    assert len(fake_anthropic.requests) == 1


def test_connection_drops_are_retried(rt: Runtime, fake_vllm: Any) -> None:
    fake_vllm.when("Review 8", Drop(), Answer())
    job_id = submit(rt, "Review 8: 'ok'", output_schema="sentiment")
    assert run(rt, job_id) == [Next("slm"), Next("slm", 0.5)]
    assert [a.outcome for a in view(rt, job_id).attempts] == ["error", "succeeded"]


def test_prompt_cache_tokens_are_recorded_and_priced_to_the_cent(
    rt: Runtime, fake_anthropic: Any
) -> None:
    system = "You label product reviews for the returns team. " * 120  # a long shared prefix
    first = submit(rt, "Review 9: 'broke in a week'", route="frontier", system=system)
    second = submit(rt, "Review 10: 'love it'", route="frontier", system=system)
    run(rt, first)
    run(rt, second)
    wrote, read = view(rt, first).attempts[0], view(rt, second).attempts[0]
    assert wrote.cache_write_tokens > 1000 and wrote.cache_read_tokens == 0
    assert read.cache_read_tokens == wrote.cache_write_tokens and read.cache_write_tokens == 0
    for a in (wrote, read):
        assert a.cost_usd == sonnet_by_hand(a)
    assert read.cost_usd < wrote.cost_usd


def test_vllm_metrics_are_read_for_the_ops_tools(fake_vllm: Any) -> None:
    fake_vllm.waiting = 7
    assert read_vllm_metrics(fake_vllm.base_url) == {"waiting": 7.0, "running": 0.0}


def test_secrets_stay_out_of_reprs(rt: Runtime) -> None:
    shown = repr(rt.backends) + repr(rt.settings) + str(rt.settings)
    assert FAKE_API_KEY not in shown
