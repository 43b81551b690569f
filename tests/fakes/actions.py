"""The scripting vocabulary of the fake providers: what one request gets back.

Each action is a small frozen dataclass; `FakeServer.when(marker, *actions)` plays them in
order, one per matching request. The helpers at the bottom turn an answer-like action
into the text the fake model "generates", the same way for both providers.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from workers.backends.sim import example_instance

__all__ = [
    "Action",
    "Answer",
    "Drop",
    "Error",
    "Hang",
    "Invalid",
    "Malformed",
    "NotRun",
    "Output",
    "Truncated",
    "count_tokens",
    "inline_refs",
    "produce",
    "rng_for",
    "split_tokens",
]


@dataclass(frozen=True)
class Answer:
    """A normal answer.

    `text=None` makes a valid one: an instance of the request's JSON Schema when it has
    one, else a short plain-text answer. `delay_s`, when given, replaces the server's
    `latency_s` for this answer. `usage` overrides token counts (wire-format keys of the
    provider: `prompt_tokens`/`completion_tokens`/`total_tokens` for vLLM,
    `input_tokens`/`output_tokens`/`cache_*_input_tokens` for Anthropic). `mean_logprob`
    is the mean of the token logprobs vLLM reports when the request asks for logprobs.
    `finish_reason` is in OpenAI's vocabulary ("stop", "length", ...); the Anthropic fake
    maps "stop" to "end_turn"/"tool_use" and "length" to "max_tokens" and passes anything
    else through as the `stop_reason`.
    """

    text: str | None = None
    finish_reason: str = "stop"
    delay_s: float | None = None
    usage: dict[str, int] | None = None
    mean_logprob: float = -0.1


@dataclass(frozen=True)
class Invalid:
    """Parses as JSON but breaks the request's schema (first required property dropped,
    or a value of the wrong type); `{}` for requests without a schema. Finishes normally."""


@dataclass(frozen=True)
class Truncated:
    """Half of a valid answer, cut off at max_tokens: finish_reason "length" (vLLM),
    stop_reason "max_tokens" (Anthropic; a forced tool call keeps the first half of the
    input's properties)."""


@dataclass(frozen=True)
class Error:
    """An HTTP error with the provider's error body. `type=None` picks the provider's
    usual type for the status; `retry_after_s` adds a `retry-after` header (seconds)."""

    status: int
    type: str | None = None
    message: str = "simulated error from the fake server"
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Hang:
    """Sleep `seconds` (without blocking the server), then answer normally. The sleep ends
    early if the client goes away, e.g. after its own timeout."""

    seconds: float


@dataclass(frozen=True)
class Drop:
    """Close the connection without sending any response (the SDKs raise
    `APIConnectionError`, not `APITimeoutError`)."""


@dataclass(frozen=True)
class Malformed:
    """HTTP 200 whose body is not a usable answer, as a proxy or a server that crashes
    mid-write can send. By default: a valid answer's JSON cut off halfway. `text` sends
    that text instead (as `content_type`: e.g. an HTML error page as "text/html"). `drop`
    sends a whole answer, valid JSON, without the fields at these dotted paths
    ("choices", "usage", "usage.input_tokens", "choices.0.message", "content", ...)."""

    text: str | None = None
    drop: tuple[str, ...] = ()
    content_type: str = "application/json"


@dataclass(frozen=True)
class NotRun:
    """In a message batch only: the request is never run, and its result is `kind`,
    "expired" (the batch's 24 hours passed) or "canceled"."""

    kind: str = "expired"


Action: TypeAlias = Answer | Invalid | Truncated | Error | Hang | Drop | Malformed | NotRun

_WORDS = [
    "the",
    "order",
    "arrived",
    "two",
    "days",
    "late",
    "and",
    "customer",
    "asks",
    "for",
    "a",
    "refund",
    "of",
    "shipping",
    "fee;",
    "invoice",
    "total",
    "matches",
    "quote",
    "account",
    "is",
    "in",
    "good",
    "standing",
    "so",
    "we",
    "recommend",
    "approving",
    "request",
    "sending",
    "short",
    "apology",
]


@dataclass(frozen=True)
class Output:
    """What an answer-like action makes the fake model generate.

    `value` is the JSON value behind `text` when the request had a schema (already broken
    for `Invalid`, not yet cut for `Truncated`); `text` is the final text.
    """

    text: str
    value: Any
    has_value: bool
    finish_reason: str
    truncated: bool


def rng_for(body: Any) -> random.Random:
    """A random generator seeded from the request body: same request, same answer."""
    content = json.dumps(body, sort_keys=True, default=str)
    digest = hashlib.sha256(content.encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def count_tokens(text: str) -> int:
    """The fakes' tokenizer: one token per 4 characters (rounded up), at least 1."""
    return max(1, math.ceil(len(text) / 4))


def split_tokens(text: str) -> list[str]:
    """`text` in ~4-character pieces (the tokens reported with logprobs)."""
    return [text[i : i + 4] for i in range(0, len(text), 4)]


def produce(
    action: Answer | Invalid | Truncated, schema: Mapping[str, Any] | None, rng: random.Random
) -> Output:
    """The text (and JSON value) an answer-like action generates for a request."""
    if isinstance(action, Answer) and action.text is not None:
        value, has_value = _try_json(action.text)
        return Output(action.text, value, has_value, action.finish_reason, truncated=False)
    if schema is not None:
        schema = inline_refs(schema)
        value = example_instance(schema, rng)
        if isinstance(action, Invalid):
            value = _break(value, schema)
        text, has_value = json.dumps(value), True
    else:
        value, has_value = None, False
        text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 20))) + "."
        if isinstance(action, Invalid):
            value, has_value, text = {}, True, "{}"
    if isinstance(action, Truncated):
        return Output(text[: max(1, len(text) // 2)], value, has_value, "length", truncated=True)
    finish = action.finish_reason if isinstance(action, Answer) else "stop"
    return Output(text, value, has_value, finish, truncated=False)


def inline_refs(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """`schema` with local `$ref`s ("#/$defs/...") replaced by what they point to, since
    `example_instance` does not follow references (recursive ones stop after 10 levels)."""
    root = schema if root is None else root
    if isinstance(schema, Mapping):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/") and depth < 10:
            target = root
            for part in ref[2:].split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            return inline_refs({**target, **rest}, root, depth + 1)
        return {k: inline_refs(v, root, depth) for k, v in schema.items()}
    if isinstance(schema, list):
        return [inline_refs(v, root, depth) for v in schema]
    return schema


def _try_json(text: str) -> tuple[Any, bool]:
    try:
        return json.loads(text), True
    except ValueError:
        return None, False


def _break(value: Any, schema: Mapping[str, Any]) -> Any:
    """A JSON value that does not satisfy `schema` (when that is possible)."""
    required = schema.get("required") or []
    if isinstance(value, dict) and required:
        return {k: v for k, v in value.items() if k != required[0]}
    if isinstance(value, dict):
        return []  # an array where an object is expected
    return {}
