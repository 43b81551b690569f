"""The fake providers (tests/fakes), driven through the real `openai` and `anthropic` SDKs.

No Redis or Postgres needed: each fake runs once per module on loopback and is reset
before every test.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_until
from tests.fakes import (
    Answer,
    Drop,
    Error,
    FakeAnthropic,
    FakeVLLM,
    Hang,
    Invalid,
    Malformed,
    Truncated,
)

CLAUDE = "claude-sonnet-4-6"  # not in the SDK's deprecated list (that warns, and warnings fail)

TICKET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "category": {"type": "string", "enum": ["billing", "shipping", "other"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "summary": {"type": "string", "maxLength": 60},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["category", "priority", "summary"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "ticket", "schema": TICKET_SCHEMA, "strict": True},
}
TOOL = {
    "name": "ticket",
    "description": "Give the answer as structured data matching this schema.",
    "input_schema": TICKET_SCHEMA,
}


def tokens(value: Any) -> int:
    """The fakes' token count, computed by hand: ceil(len(JSON text) / 4), at least 1."""
    text = value if isinstance(value, str) else json.dumps(value)
    return max(1, math.ceil(len(text) / 4))


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def vllm(fake_vllm: FakeVLLM) -> FakeVLLM:
    return fake_vllm


@pytest.fixture
def claude_fake(fake_anthropic: FakeAnthropic) -> FakeAnthropic:
    return fake_anthropic


@pytest.fixture
def oai(vllm: FakeVLLM) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=vllm.base_url, api_key="EMPTY", max_retries=0) as client:
        yield client


@pytest.fixture
def claude(claude_fake: FakeAnthropic) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        api_key="test-key", base_url=claude_fake.base_url, max_retries=0
    ) as client:
        yield client


# --- fake vLLM ------------------------------------------------------------------------------


def test_schema_constrained_answer_with_logprobs_and_usage(
    vllm: FakeVLLM, oai: openai.OpenAI
) -> None:
    messages = [
        {"role": "system", "content": "You triage support tickets."},
        {"role": "user", "content": "My parcel is two weeks late."},
    ]
    response = oai.chat.completions.create(
        model=vllm.model,
        messages=messages,
        max_tokens=256,
        logprobs=True,
        response_format=RESPONSE_FORMAT,
    )
    assert response.object == "chat.completion"
    assert response.model == vllm.model
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    content = choice.message.content
    assert content is not None
    jsonschema.validate(json.loads(content), TICKET_SCHEMA)

    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    assert "".join(e.token for e in entries) == content
    assert all(len(e.token) <= 4 and e.bytes == list(e.token.encode()) for e in entries)
    assert all(e.logprob <= 0 and e.top_logprobs == [] for e in entries)
    assert sum(e.logprob for e in entries) / len(entries) == pytest.approx(-0.1)

    assert response.usage is not None
    assert response.usage.completion_tokens == len(entries) == tokens(content)
    assert response.usage.prompt_tokens == tokens(messages)
    assert response.usage.total_tokens == response.usage.prompt_tokens + len(entries)

    (sent,) = vllm.requests
    assert sent.path == "/v1/chat/completions"
    assert sent["response_format"] == RESPONSE_FORMAT
    assert sent["logprobs"] is True and sent["max_tokens"] == 256
    assert sent.headers["authorization"] == "Bearer EMPTY"

    again = oai.chat.completions.create(
        model=vllm.model,
        messages=messages,
        max_tokens=256,
        logprobs=True,
        response_format=RESPONSE_FORMAT,
    )
    assert again.choices[0].message.content == content  # deterministic per request


def test_plain_text_answer_without_logprobs(vllm: FakeVLLM, oai: openai.OpenAI) -> None:
    response = oai.chat.completions.create(model="any-model", messages=user("Say hello."))
    choice = response.choices[0]
    assert choice.message.content and not choice.message.content.startswith("{")
    assert choice.logprobs is None
    assert response.model == "any-model"


def test_answer_overrides_text_usage_logprobs(vllm: FakeVLLM, oai: openai.OpenAI) -> None:
    vllm.default_action = Answer(
        text="forty-two",
        finish_reason="length",
        usage={"prompt_tokens": 7, "completion_tokens": 3},
        mean_logprob=-0.75,
    )
    response = oai.chat.completions.create(
        model=vllm.model, messages=user("?"), logprobs=True, top_logprobs=2
    )
    choice = response.choices[0]
    assert choice.message.content == "forty-two"
    assert choice.finish_reason == "length"
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (7, 3)
    assert response.usage.total_tokens == 10
    assert choice.logprobs is not None and choice.logprobs.content
    entries = choice.logprobs.content
    assert [e.token for e in entries] == ["fort", "y-tw", "o"]
    assert sum(e.logprob for e in entries) / 3 == pytest.approx(-0.75)
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token for e in entries)


def test_invalid_and_truncated(vllm: FakeVLLM, oai: openai.OpenAI) -> None:
    vllm.when("INVALID", Invalid()).when("CUT", Truncated())

    def ask(prompt: str) -> tuple[str, str]:
        response = oai.chat.completions.create(
            model=vllm.model,
            messages=user(prompt),
            response_format=RESPONSE_FORMAT,
        )
        choice = response.choices[0]
        return choice.message.content or "", choice.finish_reason

    text, finish = ask("INVALID please")
    assert finish == "stop"
    broken = json.loads(text)
    assert "category" not in broken  # the first required property is gone
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, TICKET_SCHEMA)

    cut, finish = ask("CUT please")
    assert finish == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut)
    full, finish = ask("CUT please")  # the script is used up: a normal answer
    assert finish == "stop"
    jsonschema.validate(json.loads(full), TICKET_SCHEMA)
    assert cut == full[: len(full) // 2]


def test_rate_limit_error_with_retry_after(vllm: FakeVLLM, oai: openai.OpenAI) -> None:
    vllm.default_action = Error(429, message="slow down", retry_after_s=2)
    with pytest.raises(openai.RateLimitError) as caught:
        oai.chat.completions.create(model=vllm.model, messages=user("hi"))
    error = caught.value
    assert error.status_code == 429
    assert error.response.headers["retry-after"] == "2"
    assert "slow down" in str(error)
    # the SDK keeps the inner `error` object as the body
    assert error.body == {
        "message": "slow down",
        "type": "TooManyRequestsError",
        "param": None,
        "code": None,
    }


def test_server_error_and_bad_request(vllm: FakeVLLM, oai: openai.OpenAI) -> None:
    vllm.default_action = Error(503, message="engine is restarting")
    with pytest.raises(openai.InternalServerError) as caught:
        oai.chat.completions.create(model=vllm.model, messages=user("hi"))
    assert caught.value.status_code == 503
    assert "retry-after" not in caught.value.response.headers

    with pytest.raises(openai.BadRequestError) as bad:
        oai.chat.completions.create(model=vllm.model, messages=[])
    assert bad.value.param == "messages"
    assert vllm.requests[-1].action is None  # rejected: no scripted action used


def test_unknown_model_is_404_when_checked(vllm: FakeVLLM, oai: openai.OpenAI) -> None:
    vllm.check_model = True
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        oai.chat.completions.create(model="other/model", messages=user("hi"))
    assert [m.id for m in oai.models.list()] == [vllm.model]


def test_markers_route_scripts(vllm: FakeVLLM, oai: openai.OpenAI) -> None:
    vllm.when("alpha", Error(500), Answer(text="A2"))
    vllm.when("beta", Answer(text="B1"))
    vllm.default_action = Answer(text="default")

    def ask(*messages: dict[str, Any]) -> str:
        response = oai.chat.completions.create(model=vllm.model, messages=list(messages))
        return response.choices[0].message.content or ""

    with pytest.raises(openai.InternalServerError):  # both markers: the first registered wins
        ask({"role": "user", "content": "beta and alpha"})
    assert ask({"role": "user", "content": [{"type": "text", "text": "beta"}]}) == "B1"
    assert ask({"role": "system", "content": "alpha"}, {"role": "user", "content": "x"}) == "A2"
    generated = ask({"role": "user", "content": "alpha again"})  # used up: Answer()
    assert generated not in ("A2", "default")
    assert ask({"role": "user", "content": "no marker"}) == "default"
    assert len(vllm.requests) == 5


def test_hang_past_client_timeout(vllm: FakeVLLM, oai: openai.OpenAI) -> None:
    vllm.default_action = Hang(30)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        oai.chat.completions.create(model=vllm.model, messages=user("hi"), timeout=0.2)
    assert time.monotonic() - started < 5
    # the fake notices the client leaving and stops counting the request
    wait_until(lambda: vllm.in_flight == 0, what="the hung request to end")


def test_drop_is_a_connection_error(vllm: FakeVLLM, oai: openai.OpenAI) -> None:
    vllm.when("drop me", Drop())
    with pytest.raises(openai.APIConnectionError) as caught:
        oai.chat.completions.create(model=vllm.model, messages=user("drop me"))
    assert not isinstance(caught.value, openai.APITimeoutError)
    response = oai.chat.completions.create(model=vllm.model, messages=user("drop me"))
    assert response.choices[0].message.content  # the client recovers; the script is used up


def test_malformed_bodies_reach_the_sdk_as_they_are(vllm: FakeVLLM, oai: openai.OpenAI) -> None:
    vllm.when("cut", Malformed())
    vllm.when("html", Malformed(text="<html>502 Bad Gateway</html>", content_type="text/html"))
    vllm.when("no choices", Malformed(drop=("choices",)))
    vllm.when("no counts", Malformed(drop=("usage.prompt_tokens", "choices.0.message")))

    with pytest.raises(json.JSONDecodeError):  # the SDK parses the body and gives up
        oai.chat.completions.create(model=vllm.model, messages=user("cut"))
    # not JSON and not said to be: the SDK hands back the text
    page = oai.chat.completions.create(model=vllm.model, messages=user("html"))
    assert page == "<html>502 Bad Gateway</html>"
    # the SDK builds response objects without validating them: missing fields read as None
    bare = oai.chat.completions.create(model=vllm.model, messages=user("no choices"))
    assert bare.choices is None and bare.usage is not None
    holes = oai.chat.completions.create(model=vllm.model, messages=user("no counts"))
    assert holes.usage is not None and holes.usage.prompt_tokens is None
    assert holes.choices[0].message is None
    assert [type(r.action) for r in vllm.requests] == [Malformed] * 4
    answered = oai.chat.completions.create(model=vllm.model, messages=user("cut"))
    assert answered.choices[0].message.content  # the script is used up


def test_metrics_count_requests_in_flight(vllm: FakeVLLM, oai: openai.OpenAI) -> None:
    def gauges() -> dict[str, float]:
        response = httpx2.get(vllm.metrics_url, timeout=5)
        response.raise_for_status()
        assert response.headers["content-type"].startswith("text/plain")
        out = {}
        for family in text_string_to_metric_families(response.text):
            assert family.type == "gauge"
            for sample in family.samples:
                assert sample.labels == {"model_name": vllm.model}
                out[sample.name] = sample.value
        return out

    assert gauges() == {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0}
    assert httpx2.get(f"{vllm.base_url}/metrics", timeout=5).status_code == 404  # root only

    vllm.waiting = 3
    vllm.when("slow", Hang(1.5))
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append(oai.chat.completions.create(model=vllm.model, messages=user("slow")))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    try:
        seen = wait_until(
            lambda: (g := gauges())["vllm:num_requests_running"] == 1 and g,
            what="running == 1",
        )
        assert seen["vllm:num_requests_waiting"] == 3
    finally:
        thread.join(10)
    assert isinstance(outcome[0], openai.types.chat.ChatCompletion)
    assert gauges()["vllm:num_requests_running"] == 0


def test_hundreds_of_concurrent_requests(vllm: FakeVLLM) -> None:
    vllm.latency_s = 0.25
    count = 200

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(
            base_url=vllm.base_url, api_key="EMPTY", max_retries=0
        ) as client:
            responses = await asyncio.gather(
                *(
                    client.chat.completions.create(model=vllm.model, messages=user(f"job {i}"))
                    for i in range(count)
                )
            )
        return [r.choices[0].message.content or "" for r in responses]

    started = time.monotonic()
    answers = asyncio.run(run())
    elapsed = time.monotonic() - started
    assert len(answers) == count and all(answers)
    assert vllm.peak_in_flight >= count // 2
    assert elapsed < 5, f"{count} requests of 0.25 s took {elapsed:.1f}s"


def test_stop_drops_hung_requests() -> None:
    fake = FakeVLLM().start()
    fake.default_action = Hang(30)
    outcome: list[BaseException] = []

    def call() -> None:
        with openai.OpenAI(base_url=fake.base_url, api_key="EMPTY", max_retries=0) as client:
            try:
                client.chat.completions.create(model=fake.model, messages=user("hi"), timeout=30)
            except openai.APIError as exc:
                outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    try:
        wait_until(lambda: fake.in_flight == 1, what="the request to hang")
        started = time.monotonic()
        fake.stop()
        assert time.monotonic() - started < 3
    finally:
        fake.stop()
        thread.join(10)
    assert len(outcome) == 1 and type(outcome[0]) is openai.APIConnectionError
    with pytest.raises(RuntimeError, match="not running"):
        _ = fake.port


# --- fake Anthropic -------------------------------------------------------------------------


def test_forced_tool_use_answer(claude_fake: FakeAnthropic, claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=CLAUDE,
        max_tokens=512,
        system="You triage support tickets.",
        messages=user("My invoice is wrong."),
        tools=[TOOL],
        tool_choice={"type": "tool", "name": "ticket"},
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.model == CLAUDE
    assert message.id.startswith("msg_")
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    (block,) = message.content
    assert isinstance(block, anthropic.types.ToolUseBlock)
    assert block.name == "ticket" and block.id.startswith("toolu_")
    jsonschema.validate(block.input, TICKET_SCHEMA)
    assert message.usage.output_tokens == tokens(block.input)
    assert message.usage.cache_creation_input_tokens == 0
    assert message.usage.cache_read_input_tokens == 0

    (sent,) = claude_fake.requests
    assert sent.path == "/v1/messages"
    assert sent.headers["authorization"] == "Bearer test-key"  # what SDK 2.x sends
    assert sent.headers["anthropic-version"]
    assert sent["tool_choice"] == {"type": "tool", "name": "ticket"}
    assert sent["tools"] == [TOOL] and sent["max_tokens"] == 512


def test_text_answer_and_usage(claude_fake: FakeAnthropic, claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(model=CLAUDE, max_tokens=64, messages=user("Hello there"))
    (block,) = message.content
    assert isinstance(block, anthropic.types.TextBlock) and block.text
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == tokens([{"type": "text", "text": "Hello there"}])
    assert message.usage.output_tokens == tokens(block.text)

    claude_fake.default_action = Answer(text="ok", usage={"output_tokens": 99})
    message = claude.messages.create(model=CLAUDE, max_tokens=64, messages=user("x"))
    assert message.content[0].type == "text" and message.content[0].text == "ok"
    assert message.usage.output_tokens == 99


def test_truncated_and_invalid_tool_use(
    claude_fake: FakeAnthropic, claude: anthropic.Anthropic
) -> None:
    claude_fake.when("CUT", Truncated()).when("BAD", Invalid())

    def ask(prompt: str) -> anthropic.types.Message:
        return claude.messages.create(
            model=CLAUDE,
            max_tokens=512,
            messages=user(prompt),
            tools=[TOOL],
            tool_choice={"type": "tool", "name": "ticket"},
        )

    cut = ask("CUT")
    assert cut.stop_reason == "max_tokens"
    full = ask("CUT")  # script used up: the whole answer to the same request
    assert full.stop_reason == "tool_use"
    cut_input = cut.content[0].input
    full_input = full.content[0].input
    assert cut_input == dict(list(full_input.items())[: len(full_input) // 2])

    bad = ask("BAD")
    assert bad.stop_reason == "tool_use"
    bad_input = bad.content[0].input
    assert "category" not in bad_input
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_input, TICKET_SCHEMA)


def test_overloaded_bad_request_and_rate_limit(
    claude_fake: FakeAnthropic, claude: anthropic.Anthropic
) -> None:
    claude_fake.when("busy", Error(529))
    claude_fake.when("long", Error(400, message="prompt is too long: 250000 tokens"))
    claude_fake.when("limit", Error(429, retry_after_s=7))

    with pytest.raises(anthropic.OverloadedError) as overloaded:
        claude.messages.create(model=CLAUDE, max_tokens=8, messages=user("busy"))
    assert overloaded.value.status_code == 529
    assert overloaded.value.type == "overloaded_error"
    assert isinstance(overloaded.value, anthropic.InternalServerError)

    with pytest.raises(anthropic.BadRequestError) as bad:
        claude.messages.create(model=CLAUDE, max_tokens=8, messages=user("long"))
    assert bad.value.api_message == "prompt is too long: 250000 tokens"
    assert "prompt is too long" in str(bad.value)
    assert bad.value.type == "invalid_request_error"
    assert bad.value.request_id and bad.value.request_id.startswith("req_")

    with pytest.raises(anthropic.RateLimitError) as limited:
        claude.messages.create(model=CLAUDE, max_tokens=8, messages=user("limit"))
    assert limited.value.response.headers["retry-after"] == "7"
    assert limited.value.type == "rate_limit_error"


def test_anthropic_malformed_bodies(
    claude_fake: FakeAnthropic, claude: anthropic.Anthropic
) -> None:
    claude_fake.when("cut", Malformed())
    claude_fake.when("no usage", Malformed(drop=("usage",)))
    claude_fake.when("no input count", Malformed(drop=("usage.input_tokens",)))

    with pytest.raises(json.JSONDecodeError):
        claude.messages.create(model=CLAUDE, max_tokens=8, messages=user("cut"))
    bare = claude.messages.create(model=CLAUDE, max_tokens=8, messages=user("no usage"))
    assert bare.content and bare.usage is None
    holes = claude.messages.create(model=CLAUDE, max_tokens=8, messages=user("no input count"))
    assert holes.usage.input_tokens is None and holes.usage.output_tokens > 0


def test_missing_api_key_and_fields(
    claude_fake: FakeAnthropic, claude: anthropic.Anthropic
) -> None:
    with pytest.raises(anthropic.AuthenticationError) as caught:
        claude.messages.create(
            model=CLAUDE,
            max_tokens=8,
            messages=user("hi"),
            extra_headers={"Authorization": anthropic.omit},
        )
    assert caught.value.type == "authentication_error"
    assert "authorization" not in claude_fake.requests[-1].headers

    with pytest.raises(anthropic.BadRequestError, match="at least one message"):
        claude.messages.create(model=CLAUDE, max_tokens=8, messages=[])

    # fields the SDK will not let us leave out, checked on the wire
    headers = {"x-api-key": "test-key", "anthropic-version": "2023-06-01"}
    raw = httpx2.post(
        f"{claude_fake.base_url}/v1/messages",
        json={"model": CLAUDE, "messages": user("hi")},
        headers=headers,
        timeout=5,
    )
    assert raw.status_code == 400
    assert raw.json()["type"] == "error"
    assert raw.json()["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: Field required",
    }
    no_version = httpx2.post(
        f"{claude_fake.base_url}/v1/messages",
        json={"model": CLAUDE, "max_tokens": 8, "messages": user("hi")},
        headers={"x-api-key": "test-key"},
        timeout=5,
    )
    assert no_version.status_code == 400
    assert "anthropic-version" in no_version.json()["error"]["message"]


def test_prompt_cache_creation_then_read(
    claude_fake: FakeAnthropic, claude: anthropic.Anthropic
) -> None:
    ephemeral = {"type": "ephemeral"}
    tool = {**TOOL, "cache_control": ephemeral}
    system = [
        {
            "type": "text",
            "text": "You triage support tickets. " * 20,
            **{"cache_control": ephemeral},
        }
    ]
    earlier = {"type": "text", "text": "The parcel is late.", "cache_control": ephemeral}
    reply = {"type": "text", "text": "Sorry to hear that."}
    last = {"type": "text", "text": "Classify the ticket."}
    messages = [
        {"role": "user", "content": [earlier]},
        {"role": "assistant", "content": [reply]},
        {"role": "user", "content": [last]},
    ]

    def ask(system_blocks: list[dict[str, Any]]) -> anthropic.types.Usage:
        return claude.messages.create(
            model=CLAUDE,
            max_tokens=512,
            system=system_blocks,
            messages=messages,
            tools=[tool],
            tool_choice={"type": "tool", "name": "ticket"},
        ).usage

    # prefix: tools, system, messages up to the last block with cache_control
    prefix_tokens = tokens([tool, *system, earlier])
    rest_tokens = tokens([reply, last])

    first = ask(system)
    assert first.cache_creation_input_tokens == prefix_tokens
    assert first.cache_read_input_tokens == 0
    assert first.input_tokens == rest_tokens
    assert first.cache_creation is not None
    assert first.cache_creation.ephemeral_5m_input_tokens == prefix_tokens

    second = ask(system)
    assert second.cache_creation_input_tokens == 0
    assert second.cache_read_input_tokens == prefix_tokens
    assert second.input_tokens == rest_tokens

    other_system = [{**system[0], "text": "Another system prompt."}]
    third = ask(other_system)
    assert third.cache_creation_input_tokens == tokens([tool, *other_system, earlier])

    plain = claude.messages.create(model=CLAUDE, max_tokens=8, messages=user("no cache"))
    assert plain.usage.cache_creation_input_tokens == 0
    assert plain.usage.cache_read_input_tokens == 0
    assert plain.usage.input_tokens == tokens([{"type": "text", "text": "no cache"}])

    claude_fake.reset()  # forgets the cache too
    assert ask(system).cache_creation_input_tokens == prefix_tokens


def test_anthropic_markers_hang_and_drop(
    claude_fake: FakeAnthropic, claude: anthropic.Anthropic
) -> None:
    claude_fake.when("SYSTEM-MARK", Error(500))
    claude_fake.when("RESULT-MARK", Drop())
    claude_fake.when("SLOW", Hang(30))

    with pytest.raises(anthropic.InternalServerError) as caught:
        claude.messages.create(
            model=CLAUDE,
            max_tokens=8,
            system=[{"type": "text", "text": "SYSTEM-MARK"}],
            messages=user("hi"),
        )
    assert caught.value.type == "api_error"

    tool_result = [
        {"type": "tool_use", "id": "toolu_1", "name": "ticket", "input": {}},
    ]
    with pytest.raises(anthropic.APIConnectionError) as dropped:
        claude.messages.create(
            model=CLAUDE,
            max_tokens=8,
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": tool_result},
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "RESULT-MARK"}
                    ],
                },
            ],
        )
    assert not isinstance(dropped.value, anthropic.APITimeoutError)

    with pytest.raises(anthropic.APITimeoutError):
        claude.messages.create(model=CLAUDE, max_tokens=8, messages=user("SLOW"), timeout=0.2)
    wait_until(lambda: claude_fake.in_flight == 0, what="the hung request to end")
