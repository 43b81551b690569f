"""A fake Anthropic Messages API, for the real `anthropic` SDK.

- `POST /v1/messages`: needs an API key (`x-api-key`, or `Authorization: Bearer ...`, which
  is what the installed SDK 2.x sends for `api_key=`) and `anthropic-version`; checks
  `model`, `max_tokens` and `messages`. A forced tool (`tool_choice` of type "tool", or
  "any") is answered with one `tool_use` block whose `input` is an instance of the tool's
  `input_schema` (`Answer(text=...)` on such a request: the text, parsed as JSON, is the
  `input`; text that is not JSON comes back as a text block instead);
  `output_config.format` of type `json_schema` gets JSON text; otherwise a text block.
- Prompt caching as the real API reports it: the cacheable prefix runs (in the order tools,
  system, messages) up to and including the last block with `cache_control` (a top-level
  `cache_control` marks the last block). Its tokens are `cache_creation_input_tokens` the
  first time that prefix is seen and `cache_read_input_tokens` afterwards; `input_tokens`
  counts only the blocks after it. Token counts: `count_tokens(json.dumps(blocks))`, where
  a string `system` or message `content` counts as `{"type": "text", "text": ...}`.
  (The real API's minimum cacheable length is not simulated.)

- Message Batches, as `client.messages.batches` calls them: `POST /v1/messages/batches`
  (`requests` of `custom_id` + `params`, each checked like a message request: a bad one
  fails the whole create with 400, as the real API does), `GET .../{id}` (the batch, its
  `request_counts` and, once ended, `results_url`), `GET .../{id}/results` (JSONL, one
  line per request, in an order of its own), `POST .../{id}/cancel`, `GET
  /v1/messages/batches` (newest first, `limit`, `after_id`). A batch ends
  `batch_processing_s` after its create; each request then plays its scripted action:
  an answer becomes a `succeeded` result, `Error` an `errored` one of its type,
  `NotRun(kind)` an `expired` or `canceled` one, `Hang`/`Drop`/`Malformed` an `errored`
  `api_error`. Cancelling an unfinished batch ends it with every request `canceled`.
  `results_line_delay_s` slows the results stream, line by line. `batches` holds them all.

Errors use Anthropic's body: `{"type": "error", "error": {"type", "message"}, "request_id"}`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from tests.fakes.actions import (
    Action,
    Answer,
    Error,
    Invalid,
    NotRun,
    Truncated,
    count_tokens,
    produce,
    rng_for,
)
from tests.fakes.server import FakeServer, new_id, retry_after_header

__all__ = ["DEFAULT_ERROR_TYPES", "FakeAnthropic", "prompt_blocks"]

DEFAULT_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_BATCH_REQUESTS = 100_000
MAX_BATCH_BYTES = 256 * 1024 * 1024


@dataclass
class FakeBatch:
    """One message batch the fake holds."""

    id: str
    requests: list[dict[str, Any]]
    created_at: float
    ends_at: float
    status: str = "in_progress"
    ended_at: float | None = None
    cancel_initiated_at: float | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    retrieved: int = 0
    results_read: int = 0


def _rfc3339(when: float | None) -> str | None:
    if when is None:
        return None
    return dt.datetime.fromtimestamp(when, dt.UTC).isoformat().replace("+00:00", "Z")


class FakeAnthropic(FakeServer):
    """A fake Anthropic API. `base_url` is what `anthropic.Anthropic(base_url=...)` wants
    (the SDK appends `/v1/messages`).

    Attributes: `api_key` (None: any non-empty key is accepted; else only this one; kept by
    `reset()`). `seen_prefixes` holds the hashes of the cache prefixes written so far
    (cleared by `reset()`).
    """

    name = "fake-anthropic"

    def __init__(self, *, latency_s: float = 0.0, api_key: str | None = None) -> None:
        super().__init__(latency_s=latency_s)
        self.api_key = api_key
        self.seen_prefixes: set[str] = set()
        self.batches: dict[str, FakeBatch] = {}
        self._batch_lock = threading.RLock()  # taken before `_lock`, never after
        self.batch_processing_s = 0.0
        self.results_line_delay_s = 0.0

    @property
    def base_url(self) -> str:
        return self.root_url

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/messages", self.handle, methods=["POST"]),
            Route("/v1/messages/batches", self.create_batch, methods=["POST"]),
            Route("/v1/messages/batches", self.list_batches, methods=["GET"]),
            Route("/v1/messages/batches/{id}", self.retrieve_batch, methods=["GET"]),
            Route("/v1/messages/batches/{id}/results", self.batch_results, methods=["GET"]),
            Route("/v1/messages/batches/{id}/cancel", self.cancel_batch, methods=["POST"]),
        ]

    def _reset_state(self) -> None:
        self.seen_prefixes.clear()
        self.batches.clear()
        self.batch_processing_s = 0.0
        self.results_line_delay_s = 0.0

    # --- Message Batches ---------------------------------------------------------------

    def _authorized(self, request: Request) -> Response | None:
        key = request.headers.get("x-api-key")
        if key is None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else None
        if not key:
            return self.error_response(401, "x-api-key header is required")
        if self.api_key is not None and key != self.api_key:
            return self.error_response(401, "invalid x-api-key")
        return None

    async def create_batch(self, request: Request) -> Response:
        denied = self._authorized(request)
        if denied is not None:
            return denied
        raw = await request.body()
        if len(raw) > MAX_BATCH_BYTES:
            return self.error_response(413, "the batch is over 256 MB")
        try:
            body = json.loads(raw)
        except ValueError:
            return self.error_response(400, "The request body is not valid JSON.")
        requests = body.get("requests") if isinstance(body, Mapping) else None
        if not isinstance(requests, list) or not requests:
            return self.error_response(400, "requests: at least one request is required")
        if len(requests) > MAX_BATCH_REQUESTS:
            return self.error_response(400, "requests: at most 100,000 requests in a batch")
        seen: set[str] = set()
        for i, item in enumerate(requests):
            custom_id = item.get("custom_id") if isinstance(item, Mapping) else None
            if not isinstance(custom_id, str) or not _CUSTOM_ID.match(custom_id):
                return self.error_response(
                    400, f"requests.{i}.custom_id: must match [a-zA-Z0-9_-]{{1,64}}"
                )
            if custom_id in seen:
                return self.error_response(
                    400, f"requests.{i}.custom_id: {custom_id!r} is not unique"
                )
            seen.add(custom_id)
            rejection = self.validate(request, item.get("params"))
            if rejection is not None:
                return rejection
        now = time.time()
        batch = FakeBatch(
            id=new_id("msgbatch_"), requests=requests, created_at=now,
            ends_at=now + self.batch_processing_s,
        )  # fmt: skip
        with self._batch_lock:
            self.batches[batch.id] = batch
        return JSONResponse(self._batch_json(batch))

    async def list_batches(self, request: Request) -> Response:
        denied = self._authorized(request)
        if denied is not None:
            return denied
        limit = int(request.query_params.get("limit", "20"))
        after = request.query_params.get("after_id")
        with self._batch_lock:
            newest_first = sorted(self.batches.values(), key=lambda b: -b.created_at)
        if after is not None:
            ids = [b.id for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
        page = newest_first[:limit]
        data = [self._batch_json(b) for b in page]
        return JSONResponse(
            {
                "data": data,
                "has_more": len(newest_first) > limit,
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
            }
        )

    async def retrieve_batch(self, request: Request) -> Response:
        denied = self._authorized(request)
        if denied is not None:
            return denied
        batch = self.batches.get(request.path_params["id"])
        if batch is None:
            return self.error_response(404, "no such message batch")
        batch.retrieved += 1
        return JSONResponse(self._batch_json(batch))

    async def cancel_batch(self, request: Request) -> Response:
        denied = self._authorized(request)
        if denied is not None:
            return denied
        batch = self.batches.get(request.path_params["id"])
        if batch is None:
            return self.error_response(404, "no such message batch")
        with self._batch_lock:
            self._process(batch)
            if batch.status == "in_progress":
                now = time.time()
                batch.cancel_initiated_at = batch.ended_at = now
                batch.results = [
                    {"custom_id": r["custom_id"], "result": {"type": "canceled"}}
                    for r in batch.requests
                ]
                batch.status = "ended"
        return JSONResponse(self._batch_json(batch))

    async def batch_results(self, request: Request) -> Response:
        denied = self._authorized(request)
        if denied is not None:
            return denied
        batch = self.batches.get(request.path_params["id"])
        if batch is None:
            return self.error_response(404, "no such message batch")
        with self._batch_lock:
            self._process(batch)
        if batch.status != "ended":
            return self.error_response(400, "the batch is still in progress")
        delay = self.results_line_delay_s
        # an order of its own, as the real API warns: newest requests first
        lines = list(reversed(batch.results))

        async def stream() -> AsyncIterator[bytes]:
            for line in lines:
                if delay:
                    await asyncio.sleep(delay)
                batch.results_read += 1
                yield json.dumps(line).encode() + b"\n"

        return StreamingResponse(stream(), media_type="application/binary")

    def _process(self, batch: FakeBatch) -> None:
        """End the batch once its time has come: each request plays its action (with the
        lock held)."""
        if batch.status != "in_progress" or time.time() < batch.ends_at:
            return
        batch.results = [
            {"custom_id": item["custom_id"], "result": self._batch_result(item["params"])}
            for item in batch.requests
        ]
        batch.status = "ended"
        batch.ended_at = time.time()

    def _batch_result(self, params: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            action: Action = self._next_action(self.prompt_text(params))
        if isinstance(action, NotRun):
            return {"type": action.kind}
        if isinstance(action, Error):
            type_ = action.type or DEFAULT_ERROR_TYPES.get(action.status, "api_error")
            return {
                "type": "errored",
                "error": {"type": "error", "error": {"type": type_, "message": action.message}},
            }
        if not isinstance(action, Answer | Invalid | Truncated):
            return {
                "type": "errored",
                "error": {"type": "error", "error": {"type": "api_error", "message": "internal"}},
            }
        message = json.loads(bytes(self.answer(params, action).body))
        return {"type": "succeeded", "message": message}

    def _batch_json(self, batch: FakeBatch) -> dict[str, Any]:
        with self._batch_lock:
            self._process(batch)
            kinds = [line["result"]["type"] for line in batch.results]
        ended = batch.status == "ended"
        counts = {
            "processing": 0 if ended else len(batch.requests),
            **{k: kinds.count(k) for k in ("succeeded", "errored", "canceled", "expired")},
        }
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": batch.status,
            "request_counts": counts,
            "created_at": _rfc3339(batch.created_at),
            "ended_at": _rfc3339(batch.ended_at),
            "expires_at": _rfc3339(batch.created_at + 86_400),
            "cancel_initiated_at": _rfc3339(batch.cancel_initiated_at),
            "archived_at": None,
            "results_url": (
                f"{self.root_url}/v1/messages/batches/{batch.id}/results" if ended else None
            ),
        }

    # --- requests ------------------------------------------------------------------------

    def prompt_text(self, body: Mapping[str, Any]) -> str:
        return "\n".join(_texts([body.get("system"), *_contents(body)]))

    def validate(self, request: Request, body: Any) -> Response | None:
        key = request.headers.get("x-api-key")
        if key is None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            key = token.strip() if scheme.lower() == "bearer" else None
        if not key:
            return self.error_response(401, "x-api-key header is required")
        if self.api_key is not None and key != self.api_key:
            return self.error_response(401, "invalid x-api-key")
        if not request.headers.get("anthropic-version"):
            return self.error_response(400, "anthropic-version: header is required")
        if not isinstance(body, Mapping):
            return self.error_response(400, "The request body must be a JSON object.")
        for name in ("model", "max_tokens", "messages"):
            if name not in body:
                return self.error_response(400, f"{name}: Field required")
        max_tokens = body["max_tokens"]
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            return self.error_response(400, "max_tokens: Input should be greater than 0")
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            return self.error_response(400, "messages: at least one message is required")
        if not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in messages):
            return self.error_response(400, "messages: each message needs a role and content")
        if body.get("stream"):
            return self.error_response(400, "stream: the fake Anthropic API does not stream")
        choice = body.get("tool_choice")
        forcing = isinstance(choice, Mapping) and choice.get("type") in ("tool", "any")
        if forcing and _forced_tool(body) is None:
            wanted = choice.get("name") if isinstance(choice, Mapping) else None
            return self.error_response(400, f"tool_choice: tool {wanted!r} is not in `tools`")
        return None

    def error_response(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
    ) -> Response:
        if type is None:
            type = DEFAULT_ERROR_TYPES.get(
                status, "api_error" if status >= 500 else "invalid_request_error"
            )
        request_id = new_id("req_")
        body = {
            "type": "error",
            "error": {"type": type, "message": message},
            "request_id": request_id,
        }
        headers = {"request-id": request_id, **retry_after_header(retry_after_s)}
        return JSONResponse(body, status_code=status, headers=headers)

    def answer(self, body: Mapping[str, Any], action: Answer | Invalid | Truncated) -> Response:
        tool = _forced_tool(body)
        schema = tool.get("input_schema") if tool is not None else _output_format_schema(body)
        output = produce(action, schema, rng_for(body))
        content: list[dict[str, Any]]
        if tool is not None and output.has_value:
            value = output.value
            if output.truncated:
                value = (
                    dict(list(value.items())[: len(value) // 2]) if isinstance(value, dict) else {}
                )
            content = [
                {"type": "tool_use", "id": new_id("toolu_"), "name": tool["name"], "input": value}
            ]
        else:
            content = [{"type": "text", "text": output.text}]
        stop_reason = {
            "stop": "tool_use" if content[0]["type"] == "tool_use" else "end_turn",
            "length": "max_tokens",
        }.get(output.finish_reason, output.finish_reason)
        usage = self._usage(body)
        usage["output_tokens"] = count_tokens(output.text)
        if isinstance(action, Answer) and action.usage:
            usage.update(action.usage)
        message = {
            "id": new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }
        return JSONResponse(message, headers={"request-id": new_id("req_")})

    def _usage(self, body: Mapping[str, Any]) -> dict[str, Any]:
        blocks = prompt_blocks(body)
        breakpoint_ = _cache_breakpoint(body, blocks)
        creation = read = 0
        ttl = "5m"
        if breakpoint_ is None:
            input_tokens = count_tokens(json.dumps(blocks))
        else:
            prefix, rest = blocks[: breakpoint_ + 1], blocks[breakpoint_ + 1 :]
            prefix_tokens = count_tokens(json.dumps(prefix))
            input_tokens = count_tokens(json.dumps(rest)) if rest else 0
            marker = prefix[-1].get("cache_control") if isinstance(prefix[-1], Mapping) else None
            if not isinstance(marker, Mapping):
                marker = body.get("cache_control") or {}
            ttl = str(marker.get("ttl") or "5m")
            digest = hashlib.sha256(
                json.dumps([body["model"], prefix], sort_keys=True).encode()
            ).hexdigest()
            with self._lock:
                seen = digest in self.seen_prefixes
                self.seen_prefixes.add(digest)
            if seen:
                read = prefix_tokens
            else:
                creation = prefix_tokens
        return {
            "input_tokens": input_tokens,
            "output_tokens": 0,
            "cache_creation_input_tokens": creation,
            "cache_read_input_tokens": read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": creation if ttl != "1h" else 0,
                "ephemeral_1h_input_tokens": creation if ttl == "1h" else 0,
            },
            "service_tier": "standard",
        }


def prompt_blocks(body: Mapping[str, Any]) -> list[Any]:
    """The request's prompt as blocks in cache order: tools, system, message contents.
    A string `system` or `content` becomes one `{"type": "text", "text": ...}` block."""
    blocks: list[Any] = list(body.get("tools") or [])
    for content in [body.get("system"), *_contents(body)]:
        if isinstance(content, str):
            if content:
                blocks.append({"type": "text", "text": content})
        elif isinstance(content, list):
            blocks.extend(content)
    return blocks


def _contents(body: Mapping[str, Any]) -> list[Any]:
    return [m.get("content") for m in body.get("messages") or [] if isinstance(m, Mapping)]


def _texts(contents: list[Any]) -> list[str]:
    """Every text in system/message contents, tool results included."""
    out: list[str] = []
    for content in contents:
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            for block in content:
                if not isinstance(block, Mapping):
                    continue
                if isinstance(block.get("text"), str):
                    out.append(block["text"])
                if "content" in block:  # tool_result
                    out.extend(_texts([block["content"]]))
    return out


def _cache_breakpoint(body: Mapping[str, Any], blocks: list[Any]) -> int | None:
    marked = [
        i
        for i, block in enumerate(blocks)
        if isinstance(block, Mapping) and isinstance(block.get("cache_control"), Mapping)
    ]
    if isinstance(body.get("cache_control"), Mapping) and blocks:
        return len(blocks) - 1  # top-level cache_control marks the last cacheable block
    return marked[-1] if marked else None


def _forced_tool(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    choice = body.get("tool_choice")
    tools = [t for t in body.get("tools") or [] if isinstance(t, Mapping)]
    if not isinstance(choice, Mapping) or not tools:
        return None
    if choice.get("type") == "any":
        return tools[0]
    if choice.get("type") == "tool":
        return next((t for t in tools if t.get("name") == choice.get("name")), None)
    return None


def _output_format_schema(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, Mapping) else None
    if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        return schema if isinstance(schema, Mapping) else {}
    return None
