"""The real backends' pure parts: request building, fault mapping, reading answers."""

from __future__ import annotations

import copy
import datetime as dt
import email.utils
import json
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from anthropic.types import Message
from openai.types.chat import ChatCompletion

from tierfleet.envelope import parse_envelope
from tierfleet.errors import (
    ProviderOverloaded,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from tierfleet.prices import Usage
from workers.backends.anthropic_api import build_request, read_message
from workers.backends.faults import retry_after_s, sdk_faults, status_fault
from workers.backends.vllm import _messages, _response_format, read_completion


def test_retry_after_in_seconds_milliseconds_or_a_date() -> None:
    assert retry_after_s({"retry-after": "7"}) == 7.0
    assert retry_after_s({"retry-after": "1.5"}) == 1.5
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30)
    from_date = retry_after_s({"retry-after": email.utils.format_datetime(later, usegmt=True)})
    assert from_date is not None and 25 < from_date <= 30
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None and retry_after_s(None) is None
    assert retry_after_s({"retry-after": "999999"}) == 3600.0


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (429, RateLimited),
        (529, ProviderOverloaded),
        (503, ProviderOverloaded),
        (500, ProviderUnavailable),
        (502, ProviderUnavailable),
        (408, ProviderTimeout),
        (400, ProviderRejected),
        (401, ProviderRejected),
        (413, ProviderRejected),
    ],
)
def test_status_codes_map_to_retryable_or_permanent(status: int, kind: type) -> None:
    fault = status_fault("anthropic", status, "boom", {"retry-after": "3"})
    assert type(fault) is kind
    assert str(fault) == f"anthropic {status}: boom"
    if status in (429, 529, 503, 500, 502):
        assert fault.retry_after_s == 3.0  # type: ignore[attr-defined]


def job(**fields: object):  # type: ignore[no-untyped-def]
    return parse_envelope({"feature": "f", "prompt": "Sentiment: 'great'", **fields})


def test_vllm_asks_for_schema_constrained_output_only_with_a_schema() -> None:
    constrained = _response_format(job(output_schema="sentiment"))
    fmt = constrained["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["name"] == "sentiment" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["required"] == ["label"]
    assert _response_format(job()) == {}


def test_vllm_messages_put_the_system_prompt_first() -> None:
    assert _messages(job(system="Be terse.")) == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Sentiment: 'great'"},
    ]


def test_claude_request_caches_tools_system_and_the_shared_conversation() -> None:
    spec = parse_envelope(
        {
            "feature": "f",
            "system": "You label reviews.",
            "messages": [
                {"role": "user", "content": "Example: 'bad' ->"},
                {"role": "assistant", "content": '{"label": "negative"}'},
                {"role": "user", "content": "'great' ->"},
            ],
            "output_schema": "sentiment",
        }
    )
    request = build_request(spec, model="claude-sonnet-4-6", prompt_cache=True)
    eph = {"type": "ephemeral"}
    assert request["system"] == [
        {"type": "text", "text": "You label reviews.", "cache_control": eph}
    ]
    assert request["tools"][0]["cache_control"] == eph
    assert request["tools"][0]["input_schema"]["required"] == ["label"]
    assert request["tool_choice"] == {"type": "tool", "name": "sentiment"}
    blocks = [m["content"][-1] for m in request["messages"]]
    assert [b.get("cache_control") for b in blocks] == [None, eph, None]
    assert (request["model"], request["max_tokens"]) == ("claude-sonnet-4-6", 512)


def test_claude_request_without_caching_or_schema() -> None:
    request = build_request(job(system="s"), model="m", prompt_cache=False)
    assert "cache_control" not in request["system"][0]
    assert "tools" not in request and "tool_choice" not in request


def test_a_non_object_schema_is_wrapped_for_tool_use() -> None:
    schema = {"type": "array", "items": {"type": "string"}}
    request = build_request(job(output_schema=schema), model="m", prompt_cache=False)
    wrapped = request["tools"][0]["input_schema"]
    assert wrapped == {"type": "object", "properties": {"value": schema}, "required": ["value"]}


# --- reading answers: the SDKs build response objects without validating them ---------------

COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "meta-llama/Meta-Llama-3-8B-Instruct",
    "choices": [
        {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": '{"label": "positive"}'},
            "logprobs": {
                "content": [
                    {"token": '{"la', "logprob": -0.5, "bytes": [], "top_logprobs": []},
                    {"token": 'bel"', "logprob": -0.1, "bytes": [], "top_logprobs": []},
                ]
            },
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
}
MESSAGE: dict[str, Any] = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-6",
    "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "sentiment", "input": {"label": "mixed"}}
    ],
    "stop_reason": "tool_use",
    "usage": {
        "input_tokens": 20,
        "output_tokens": 6,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": 4,
    },
}
GONE = object()


def changed(body: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """`body` with the field at a dotted path set to `value` (deleted for `GONE`)."""
    out = copy.deepcopy(body)
    *parents, last = path.split(".")
    node: Any = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key: Any = int(last) if isinstance(node, list) else last
    if value is GONE:
        del node[key]
    else:
        node[key] = value
    return out


def test_a_chat_completion_is_read_with_usage_and_mean_logprob() -> None:
    completion = read_completion(ChatCompletion.construct(**COMPLETION))
    assert completion.text == '{"label": "positive"}'
    assert completion.usage == Usage(input_tokens=12, output_tokens=5)
    assert completion.finish_reason == "stop"
    assert completion.mean_logprob == pytest.approx(-0.3)
    # an answer without usage is still an answer, its tokens unknown
    bare = read_completion(ChatCompletion.construct(**changed(COMPLETION, "usage", GONE)))
    assert bare.usage == Usage() and bare.text == '{"label": "positive"}'


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("choices", GONE, "no choices.0.message"),
        ("choices", [], "no choices.0.message"),
        ("choices.0.message", GONE, "no choices.0.message"),
        ("choices.0.message.content", 42, "choices.0.message.content is int"),
        ("usage.prompt_tokens", GONE, "no usage.prompt_tokens"),
        ("usage.completion_tokens", "many", "usage.completion_tokens is 'many', not a token"),
        ("choices.0.logprobs.content.1.logprob", None, "a token without a logprob"),
    ],
)
def test_a_chat_completion_without_an_answer_is_malformed(
    path: str, value: object, named: str
) -> None:
    response = ChatCompletion.construct(**changed(COMPLETION, path, value))
    with pytest.raises(ProviderUnavailable) as caught:
        read_completion(response)
    assert str(caught.value).startswith("vllm sent a malformed response: ")
    assert named in str(caught.value)


def test_a_message_is_read_with_its_cache_counts() -> None:
    completion = read_message(Message.construct(**MESSAGE), wrapped=False)
    assert json.loads(completion.text) == {"label": "mixed"}
    assert completion.usage == Usage(input_tokens=20, output_tokens=6, cache_read_tokens=4)
    assert completion.finish_reason == "stop"


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("usage", GONE, "no usage.input_tokens"),
        ("usage.input_tokens", GONE, "no usage.input_tokens"),
        ("usage.output_tokens", -1, "usage.output_tokens is -1, not a token count"),
        ("usage.cache_read_input_tokens", 1.5, "usage.cache_read_input_tokens is 1.5"),
        ("content", GONE, "no content"),
        ("content", {"type": "text"}, "content is dict, not a list"),
        ("content.0", {"type": "text", "text": None}, "a text block of the content has no text"),
    ],
)
def test_a_message_without_an_answer_is_malformed(path: str, value: object, named: str) -> None:
    message = Message.construct(**changed(MESSAGE, path, value))
    with pytest.raises(ProviderUnavailable) as caught:
        read_message(message, wrapped=False)
    assert str(caught.value).startswith("anthropic sent a malformed response: ")
    assert named in str(caught.value)


def test_a_body_that_is_not_json_is_a_malformed_response() -> None:
    with pytest.raises(
        ProviderUnavailable, match="malformed response: expected a message, got '<h"
    ):
        read_message("<html>502 Bad Gateway</html>", wrapped=False)
    for provider, sdk in (("vllm", openai), ("anthropic", anthropic)):
        with (
            pytest.raises(ProviderUnavailable, match=f"^{provider} sent a malformed response: the"),
            sdk_faults(provider, sdk, 1.0),
        ):
            json.loads('{"id": "msg_1", "content": [')  # what the SDK does with a cut body


def test_each_tier_is_booked_as_its_own_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OpenAI-compatible tier's attempts say `openai`, a vLLM tier's `vllm`, whatever
    client class serves them."""
    from tierfleet.settings import Settings
    from workers.runtime import make_backends

    fleet = tmp_path / "fleet.toml"
    fleet.write_text(
        '[[tier]]\nname = "small"\nbackend = "vllm"\nmodel = "m1"\n'
        'base_url = "http://127.0.0.1:9/v1"\n\n'
        '[[tier]]\nname = "big"\nbackend = "openai"\nmodel = "m2"\n'
        'base_url = "http://127.0.0.1:9/v1"\n'
    )
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    backends = make_backends(Settings.from_env(fleet_file=fleet), ["small", "big"])
    try:
        assert {name: b.provider for name, b in backends.items()} == {
            "small": "vllm",
            "big": "openai",
        }
    finally:
        for backend in backends.values():
            backend.close()  # type: ignore[attr-defined]
