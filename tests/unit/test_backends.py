"""The real backends' pure parts: request building and fault mapping."""

from __future__ import annotations

import datetime as dt
import email.utils

import pytest

from tierfleet.envelope import parse_envelope
from tierfleet.errors import (
    ProviderOverloaded,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from workers.backends.anthropic_api import build_request
from workers.backends.faults import retry_after_s, status_fault
from workers.backends.vllm import _messages, _response_format


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
