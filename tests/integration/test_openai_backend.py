"""The `openai` backend through the real `openai` SDK against a fake of OpenAI's API:
structured outputs (strict where the schema allows), logprobs only when the tier asks,
usage with cached tokens, faults mapped, the key never shown; and an `openai` ladder run
on the ledger, each attempt booked with its own model and price."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import Answer, Drop, Error, FakeOpenAI, Hang, Invalid
from tierfleet.constants import JobStatus
from tierfleet.db import Ledger
from tierfleet.envelope import JobSpec, parse_envelope
from tierfleet.errors import (
    ConfigurationError,
    ProviderOverloaded,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from tierfleet.prices import PriceBook, Usage
from tierfleet.settings import Settings
from tierfleet.store import get_job, insert_job
from tierfleet.transport import make_celery
from workers.backends.openai_api import OpenAIBackend, strict_schema
from workers.execute import Next, attempt_job, triage_job
from workers.runtime import Runtime, make_backends

OPENAI_KEY = "sk-proj-FAKE-OPENAI-SECRET-0123456789"


@pytest.fixture(scope="session")
def _fake_openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(api_key=OPENAI_KEY) as fake:
        yield fake


@pytest.fixture
def fake_openai(_fake_openai: FakeOpenAI) -> FakeOpenAI:
    _fake_openai.reset()
    return _fake_openai


def backend(fake: FakeOpenAI, **changes: Any) -> OpenAIBackend:
    options: dict[str, Any] = {
        "base_url": fake.base_url,
        "model": "gpt-4o-mini",
        "tier": "mini",
        "api_key": OPENAI_KEY,
        **changes,
    }
    return OpenAIBackend(**options)


def job(prompt: str = "Tag: 'refund please'", **fields: Any) -> JobSpec:
    return parse_envelope({"feature": "tags", "prompt": prompt, **fields})


def test_a_schema_that_can_be_strict_is_sent_strict_and_answered_to_it(
    fake_openai: FakeOpenAI,
) -> None:
    b = backend(fake_openai)
    completion = b.complete(job(output_schema="entities", max_tokens=80), timeout_s=5)
    fmt = fake_openai.requests[0]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    sent = fmt["json_schema"]["schema"]
    assert sent["additionalProperties"] is False and set(sent["required"]) == set(
        sent["properties"]
    )
    assert "$schema" not in sent  # annotations and unsupported narrowing keywords left out
    assert isinstance(json.loads(completion.text), dict)
    assert fake_openai.requests[0]["max_tokens"] == 80  # a compatible server's name for it
    b.close()


def test_a_schema_with_an_optional_property_is_sent_as_it_is_not_strict(
    fake_openai: FakeOpenAI,
) -> None:
    b = backend(fake_openai)
    spec = job(output_schema="sentiment")
    b.complete(spec, timeout_s=5)  # the fake refuses a strict schema OpenAI would refuse
    fmt = fake_openai.requests[0]["response_format"]["json_schema"]
    assert fmt["strict"] is False and fmt["name"] == "sentiment"
    assert fmt["schema"] == dict(spec.output_schema or {})
    b.close()


@pytest.mark.parametrize(
    ("schema", "strict"),
    [
        ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}, True),
        (  # nested objects are closed too; $defs and anyOf walked
            {
                "type": "object",
                "properties": {
                    "x": {"anyOf": [{"$ref": "#/$defs/p"}, {"type": "null"}]},
                    "ys": {"type": "array", "items": {"type": "string", "minLength": 1}},
                },
                "required": ["x", "ys"],
                "$defs": {
                    "p": {"type": "object", "properties": {"n": {"type": "integer"}},
                          "required": ["n"]}
                },
            },
            True,
        ),
        ({"type": "array", "items": {"type": "string"}}, False),  # the root must be an object
        ({"type": "object", "properties": {"a": {}}, "required": []}, False),  # optional
        ({"type": "object", "properties": {}, "additionalProperties": True}, False),
        ({"type": "object", "oneOf": [{"required": ["a"]}], "properties": {}}, False),
        ({"type": "object", "properties": {"a": {"not": {"type": "null"}}},
          "required": ["a"]}, False),
    ],
)  # fmt: skip
def test_strict_mode_is_used_exactly_where_the_schema_allows(
    schema: dict[str, Any], strict: bool
) -> None:
    from tests.fakes.openai_server import strict_problem

    copy = strict_schema(schema)
    assert (copy is not None) is strict
    if copy is not None:
        assert strict_problem(copy, ()) is None  # what OpenAI accepts
        assert "minLength" not in json.dumps(copy)


def test_on_openais_api_a_non_object_schema_is_wrapped_and_its_answer_unwrapped(
    fake_openai: FakeOpenAI,
) -> None:
    b = backend(fake_openai, official=True)  # as OpenAI's API: the root must be an object
    schema = {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "minItems": 1}
    completion = b.complete(job(output_schema=schema, max_tokens=40), timeout_s=5)
    [request] = fake_openai.requests
    fmt = request["response_format"]["json_schema"]
    assert fmt["strict"] is True and fmt["schema"]["required"] == ["value"]
    assert fmt["schema"]["properties"]["value"]["items"] == schema["items"]
    assert request["max_completion_tokens"] == 40 and "max_tokens" not in request.body
    answer = json.loads(completion.text)
    assert isinstance(answer, list) and set(answer) <= {"a", "b"}
    compatible = backend(fake_openai)
    assert compatible.response_format(job(output_schema=schema)) == {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": schema, "strict": False},
        }
    }  # a compatible server takes the schema as it is
    b.close()
    compatible.close()


def test_logprobs_are_asked_for_only_when_the_tier_says_so(fake_openai: FakeOpenAI) -> None:
    quiet, asking = backend(fake_openai), backend(fake_openai, logprobs=True)
    assert quiet.complete(job(), timeout_s=5).mean_logprob is None
    assert "logprobs" not in fake_openai.requests[0].body
    assert asking.complete(job(), timeout_s=5).mean_logprob == pytest.approx(-0.1)
    assert fake_openai.requests[1]["logprobs"] is True
    quiet.close()
    asking.close()


def test_cached_prompt_tokens_are_booked_as_cache_reads_at_half_price(
    fake_openai: FakeOpenAI,
) -> None:
    b = backend(fake_openai)
    counts = {"prompt_tokens": 1200, "completion_tokens": 40}
    fake_openai.when("Tag", Answer(text="ok", usage=counts))
    fake_openai.cached_tokens = 1024
    usage = b.complete(job(), timeout_s=5).usage
    assert usage == Usage(input_tokens=176, output_tokens=40, cache_read_tokens=1024)
    price = PriceBook.load()["gpt-4o-mini"]
    # $0.15 per Mtok in, $0.60 out, cached input at half the input price, no write surcharge
    by_hand = (176 * Decimal("0.15") + 40 * Decimal("0.60") + 1024 * Decimal("0.075")) / 10**6
    assert price.cost_usd(usage) == by_hand.quantize(Decimal("1e-8"))
    assert price.cost_usd(usage, batch=True) == (by_hand / 2).quantize(Decimal("1e-8"))
    b.close()


@pytest.mark.parametrize(
    ("action", "fault", "retry_after"),
    [
        (Error(429, retry_after_s=2), RateLimited, 2.0),
        (Error(500), ProviderUnavailable, None),
        (Error(503, retry_after_s=1), ProviderOverloaded, 1.0),
        (Drop(), ProviderUnavailable, None),
        (Error(400, message="Invalid 'messages[0]'"), ProviderRejected, None),
    ],
)
def test_provider_faults_map_onto_retryable_or_permanent(
    fake_openai: FakeOpenAI, action: Any, fault: type, retry_after: float | None
) -> None:
    b = backend(fake_openai)
    fake_openai.when("Tag", action)
    with pytest.raises(fault) as caught:
        b.complete(job(), timeout_s=5)
    assert str(caught.value).startswith("openai")
    assert getattr(caught.value, "retry_after_s", None) == retry_after
    assert len(fake_openai.requests) == 1  # the SDK retried nothing
    b.close()


def test_a_slow_answer_times_out(fake_openai: FakeOpenAI) -> None:
    b = backend(fake_openai)
    fake_openai.when("Tag", Hang(5.0))
    with pytest.raises(ProviderTimeout, match=r"openai did not answer within 0\.3s"):
        b.complete(job(), timeout_s=0.3)
    b.close()


def test_the_key_is_sent_but_never_shown(
    fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    good, wrong = backend(fake_openai), backend(fake_openai, api_key="sk-proj-WRONG-KEY")
    good.complete(job(), timeout_s=5)
    assert fake_openai.requests[0].headers["authorization"] == f"Bearer {OPENAI_KEY}"
    with pytest.raises(ProviderRejected, match="openai 401: Incorrect API key") as caught:
        wrong.complete(job(), timeout_s=5)
    shown = repr(good) + str(caught.value) + caplog.text
    assert "sk-proj-" not in shown
    assert caplog.text  # the SDK did log the requests at DEBUG
    good.close()
    wrong.close()


# --- the ladder on the ledger --------------------------------------------------------------


def fleet_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(body)
    return path


def openai_settings(settings: Settings, path: Path, **env: Any) -> Settings:
    return Settings.from_env(
        **{**settings.model_dump(exclude={"fleet_file"}), "backend": "real", **env},
        fleet_file=path,
    )


def test_an_openai_ladder_escalates_mini_to_gpt4o_and_books_each_model(
    settings: Settings, ledger: Ledger, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    path = fleet_file(
        tmp_path,
        f"""
        [[tier]]
        name = "mini"
        backend = "openai"
        model = "gpt-4o-mini"
        base_url = "{fake_openai.base_url}"
        api_key_env = "OPENAI_API_KEY"
        logprobs = true
        [[tier]]
        name = "gpt4o"
        backend = "openai"
        model = "gpt-4o"
        base_url = "{fake_openai.base_url}"
        api_key_env = "OPENAI_API_KEY"
        """,
    )
    rt = Runtime.build(
        openai_settings(settings, path, openai_api_key=OPENAI_KEY),
        make_celery(settings),
        ledger,
    )
    try:
        assert OPENAI_KEY not in repr(rt.backends)
        fake_openai.when("Label 1", Invalid())
        spec = parse_envelope(
            {"feature": "tags", "prompt": "Label 1: 'great'", "output_schema": "sentiment"}
        )
        with rt.ledger.session() as s:
            job_id, _ = insert_job(s, spec)
        step = triage_job(rt, job_id)
        steps = []
        while step is not None:
            steps.append(step)
            step = attempt_job(rt, job_id, step.tier)
        assert steps == [Next("mini"), Next("gpt4o")]
        with rt.ledger.session() as s:
            done = get_job(s, job_id)
        assert done.status is JobStatus.SUCCEEDED
        rows = [(a.tier, a.provider, a.model, a.outcome) for a in done.attempts]
        assert rows == [
            ("mini", "openai", "gpt-4o-mini", "invalid"),
            ("gpt4o", "openai", "gpt-4o", "succeeded"),
        ]
        prices = PriceBook.load()
        for a in done.attempts:
            usage = Usage(input_tokens=a.input_tokens, output_tokens=a.output_tokens)
            assert a.cost_usd == prices[a.model].cost_usd(usage) > 0
        assert [r.get("logprobs") for r in fake_openai.requests] == [True, None]
    finally:
        rt.close()
        rt.celery.close()


def test_an_openai_rung_on_openais_api_needs_its_key_and_a_vllm_rung_its_url(
    settings: Settings, tmp_path: Path
) -> None:
    path = fleet_file(
        tmp_path,
        """
        [[tier]]
        name = "mini"
        backend = "openai"
        model = "gpt-4o-mini"
        [[tier]]
        name = "local"
        backend = "openai"
        model = "llama3.1:8b"
        base_url = "http://127.0.0.1:9/v1"
        api_key_env = "LOCAL_LLM_API_KEY"
        [[tier]]
        name = "gpu"
        backend = "vllm"
        model = "meta-llama/Meta-Llama-3-8B-Instruct"
        """,
    )
    bare = openai_settings(settings, path, openai_api_key=None, vllm_base_url=None)
    with pytest.raises(ConfigurationError, match="tier 'mini' \\(openai\\) needs OPENAI_API_KEY"):
        make_backends(bare, ["mini"])
    with pytest.raises(ConfigurationError, match="tier 'gpu' \\(vllm\\) needs a base URL"):
        make_backends(bare, ["gpu"])
    local = make_backends(bare, ["local"])["local"]  # a compatible server: no key needed
    assert local.provider == "openai" and type(local).__name__ == "OpenAIBackend"
    keyed = openai_settings(settings, path, openai_api_key=OPENAI_KEY)
    mini = make_backends(keyed, ["mini"])["mini"]
    assert isinstance(mini, OpenAIBackend) and mini.base_url is None  # the SDK's default
    assert "max_completion_tokens" in mini.build_request(job())  # OpenAI's current name
    assert mini.build_request(job())["max_completion_tokens"] == 512
    for b in (local, mini):
        b.close()  # type: ignore[attr-defined]
