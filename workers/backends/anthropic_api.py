"""The frontier tier: Claude through the official `anthropic` SDK (Messages API).

- Output schemas: the schema becomes the `input_schema` of one tool the model is made to
  call (`tool_choice`), and the tool's input is the answer, validated like any other.
- Prompt caching: the tool definition, the system prompt and, in a conversation, the
  turns before the last user message are marked `cache_control: ephemeral`; the usage's
  `cache_creation_input_tokens` and `cache_read_input_tokens` are recorded and priced with
  the cache multipliers. (Prefixes under the model's minimum are simply not cached.)
- The SDK's retries are off; the escalation policy owns retries (`faults.py`).
- Message Batches (`client.messages.batches`): the same request as `params` of a batch
  line whose `custom_id` is the attempt id; results are streamed and read like a message.
  An `errored` result maps onto the same faults as an HTTP error of its type.
- `temperature` is not sent: the Messages API of current Claude models takes none (the
  SDK has no such argument); the model's default sampling applies.

Imported only by a worker that serves the frontier tier.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import anthropic
from anthropic.types import Message

from tierfleet.envelope import JobSpec
from tierfleet.errors import RequestNotRun
from tierfleet.prices import Usage
from workers.backends.base import BatchState, Completion
from workers.backends.faults import (
    expect,
    field,
    malformed_fault,
    pooled_client,
    sdk_faults,
    status_fault,
    token_count,
)

PROVIDER = "anthropic"
EPHEMERAL = {"type": "ephemeral"}
_BATCH_TIMEOUT_S = 600.0  # creating a batch of 256 MB, or streaming its results
# An `errored` batch result's error type, as the HTTP status the same error has.
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
_WRAPPED = "value"  # the property a non-object output schema is wrapped in


class AnthropicBackend:
    """A `ModelBackend` for Claude. Thread-safe: one client shared by the worker threads."""

    def __init__(
        self,
        *,
        api_key: str,
        model: str,
        base_url: str | None = None,
        tier: str = "frontier",
        prompt_cache: bool = True,
        max_connections: int = 64,
    ) -> None:
        self.tier = tier
        self.model = model
        self.provider = PROVIDER
        self.prompt_cache = prompt_cache
        self._client = anthropic.Anthropic(
            api_key=api_key,
            base_url=base_url,
            max_retries=0,  # the escalation policy owns retries
            http_client=pooled_client(max_connections),
        )

    def __repr__(self) -> str:  # never the key
        return f"AnthropicBackend(model={self.model!r}, prompt_cache={self.prompt_cache})"

    def complete(self, job: JobSpec, *, timeout_s: float) -> Completion:
        request = build_request(job, model=self.model, prompt_cache=self.prompt_cache)
        with sdk_faults(PROVIDER, anthropic, timeout_s):
            message = self._client.messages.create(**request, timeout=timeout_s)
        return read_message(message, wrapped=_needs_wrapping(job))

    def close(self) -> None:
        self._client.close()

    # --- Message Batches -------------------------------------------------------------

    def batch_request(self, job: JobSpec, custom_id: str) -> dict[str, Any]:
        params = build_request(job, model=self.model, prompt_cache=self.prompt_cache)
        return {"custom_id": custom_id, "params": params}

    def create_batch(self, requests: list[dict[str, Any]]) -> BatchState:
        with sdk_faults(PROVIDER, anthropic, _BATCH_TIMEOUT_S):
            batch = self._client.messages.batches.create(
                requests=requests,  # type: ignore[arg-type]
                timeout=_BATCH_TIMEOUT_S,
            )
        return _batch_state(batch)

    def retrieve_batch(self, batch_id: str) -> BatchState:
        with sdk_faults(PROVIDER, anthropic, _BATCH_TIMEOUT_S):
            return _batch_state(self._client.messages.batches.retrieve(batch_id))

    def cancel_batch(self, batch_id: str) -> BatchState:
        with sdk_faults(PROVIDER, anthropic, _BATCH_TIMEOUT_S):
            return _batch_state(self._client.messages.batches.cancel(batch_id))

    def list_batches(self, *, created_after: dt.datetime) -> Iterator[BatchState]:
        """The provider's batches, newest first, down to `created_after`."""
        with sdk_faults(PROVIDER, anthropic, _BATCH_TIMEOUT_S):
            for batch in self._client.messages.batches.list(limit=100):
                if batch.created_at < created_after:
                    return
                yield _batch_state(batch)

    def batch_results(self, batch_id: str) -> Iterator[tuple[str, Any]]:
        """`(custom_id, result)` for each line of an ended batch's results, streamed."""
        with sdk_faults(PROVIDER, anthropic, _BATCH_TIMEOUT_S):
            for line in self._client.messages.batches.results(batch_id, timeout=_BATCH_TIMEOUT_S):
                yield line.custom_id, line.result

    def read_batch_result(self, result: Any, job: JobSpec) -> Completion:
        kind = getattr(result, "type", None)
        if kind == "succeeded":
            return read_message(result.message, wrapped=_needs_wrapping(job))
        if kind == "errored":
            inner = getattr(getattr(result, "error", None), "error", None)
            error_type = str(getattr(inner, "type", "api_error"))
            message = str(getattr(inner, "message", "") or error_type)
            raise status_fault(PROVIDER, _ERROR_STATUS.get(error_type, 500), message, None)
        if kind in ("expired", "canceled"):
            raise RequestNotRun(
                f"{PROVIDER}: the batch request was {kind} before it ran", kind=str(kind)
            )
        raise malformed_fault(PROVIDER, f"a batch result of type {kind!r}")


def _batch_state(batch: Any) -> BatchState:
    counts = batch.request_counts
    return BatchState(
        id=batch.id,
        status=batch.processing_status,
        created_at=batch.created_at,
        ended_at=batch.ended_at,
        counts={
            name: int(getattr(counts, name))
            for name in ("processing", "succeeded", "errored", "canceled", "expired")
        },
    )


def read_message(message: Any, *, wrapped: bool) -> Completion:
    """The answer in a Messages API response. A body without one (no content, no usage, a
    token count that is not one) is a malformed response, never billed."""
    expect(PROVIDER, message, Message, "a message")
    usage = Usage(
        input_tokens=token_count(PROVIDER, message, "usage.input_tokens"),
        output_tokens=token_count(PROVIDER, message, "usage.output_tokens"),
        cache_write_tokens=token_count(
            PROVIDER, message, "usage.cache_creation_input_tokens", required=False
        ),
        cache_read_tokens=token_count(
            PROVIDER, message, "usage.cache_read_input_tokens", required=False
        ),
    )
    content = field(PROVIDER, message, "content")
    if not isinstance(content, list):
        raise malformed_fault(PROVIDER, f"content is {type(content).__name__}, not a list")
    return Completion(
        text=_answer_text(content, wrapped=wrapped),
        usage=usage,
        finish_reason="length" if message.stop_reason == "max_tokens" else "stop",
    )


def build_request(job: JobSpec, *, model: str, prompt_cache: bool) -> dict[str, Any]:
    """The `messages.create` arguments for `job` (a pure function, tested on its own)."""
    cache = {"cache_control": EPHEMERAL} if prompt_cache else {}
    messages: list[dict[str, Any]] = [
        {"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
        for m in job.messages
    ]
    if len(messages) > 1 and cache:  # the shared conversation before the last user turn
        messages[-2]["content"][-1].update(cache)
    request: dict[str, Any] = {
        "model": model,
        "max_tokens": job.max_tokens,
        "messages": messages,
    }
    if job.system:
        request["system"] = [{"type": "text", "text": job.system, **cache}]
    if job.output_schema is not None:
        name = _tool_name(job)
        schema = dict(job.output_schema)
        if _needs_wrapping(job):
            schema = {"type": "object", "properties": {_WRAPPED: schema}, "required": [_WRAPPED]}
        request["tools"] = [
            {
                "name": name,
                "description": "Give the answer as structured data matching this schema.",
                "input_schema": schema,
                **cache,
            }
        ]
        request["tool_choice"] = {"type": "tool", "name": name}
    return request


def _tool_name(job: JobSpec) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", job.output_schema_name or "answer")[:64]


def _needs_wrapping(job: JobSpec) -> bool:
    schema = job.output_schema
    return schema is not None and schema.get("type", "object") != "object"


def _answer_text(content: list[Any], *, wrapped: bool) -> str:
    for block in content:
        if getattr(block, "type", None) == "tool_use":
            value = getattr(block, "input", None)
            if wrapped and isinstance(value, Mapping):
                value = value.get(_WRAPPED)
            return json.dumps(value)
    texts: list[str] = []
    for block in content:
        if getattr(block, "type", None) == "text":
            text = getattr(block, "text", None)
            if not isinstance(text, str):
                raise malformed_fault(PROVIDER, "a text block of the content has no text")
            texts.append(text)
    return "".join(texts)
