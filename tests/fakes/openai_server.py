"""A fake vLLM OpenAI-compatible server, for the real `openai` SDK.

- `POST /v1/chat/completions`: a `chat.completion` object. A `response_format` of type
  `json_schema` (also vLLM's `structured_outputs.json` and the older `guided_json`)
  constrains the answer to the schema, as vLLM's structured outputs do; `logprobs: true`
  adds `choices[0].logprobs.content` (one entry per ~4-character token, with `bytes` and
  `top_logprobs`), whose mean is the action's `mean_logprob`.
- `GET /metrics` at the server root (not under /v1): Prometheus text with the gauges
  `vllm:num_requests_running` (requests in flight in the fake) and
  `vllm:num_requests_waiting` (the `waiting` attribute).
- `GET /v1/models`, `GET /health`.

`FakeOpenAI` is OpenAI's own API on the same wire format: a bearer key checked, cached
prompt tokens reported in `usage.prompt_tokens_details`, and a `strict` json_schema refused
with OpenAI's 400 unless every object is closed and requires all its properties.

Errors use vLLM's body: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from tests.fakes.actions import (
    Answer,
    Invalid,
    Truncated,
    count_tokens,
    produce,
    rng_for,
    split_tokens,
)
from tests.fakes.server import FakeServer, new_id, retry_after_header

__all__ = ["FakeOpenAI", "FakeVLLM"]

DEFAULT_MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
_JSON_OBJECT_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
}


class FakeVLLM(FakeServer):
    """A fake vLLM server. `base_url` is what `openai.OpenAI(base_url=...)` wants.

    Attributes: `model` (served model name, in `/v1/models` and the metrics labels),
    `waiting` (the `vllm:num_requests_waiting` gauge; `reset()` sets it to 0), `check_model`
    (when True, a request for another model gets vLLM's 404, as the real server does; off
    by default; `reset()` restores the constructor's value).
    """

    name = "fake-vllm"

    def __init__(
        self, *, model: str = DEFAULT_MODEL, latency_s: float = 0.0, check_model: bool = False
    ) -> None:
        super().__init__(latency_s=latency_s)
        self.model = model
        self.waiting = 0
        self.check_model = check_model
        self._check_model_default = check_model

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    @property
    def metrics_url(self) -> str:
        return f"{self.root_url}/metrics"

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/chat/completions", self.handle, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/metrics", self._metrics, methods=["GET"]),
            Route("/health", self._health, methods=["GET"]),
        ]

    def _reset_state(self) -> None:
        self.waiting = 0
        self.check_model = self._check_model_default

    # --- requests ------------------------------------------------------------------------

    def prompt_text(self, body: Mapping[str, Any]) -> str:
        parts: list[str] = []
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, Mapping) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(
                    p["text"]
                    for p in content
                    if isinstance(p, Mapping) and isinstance(p.get("text"), str)
                )
        return "\n".join(parts)

    def validate(self, request: Request, body: Any) -> Response | None:
        if not isinstance(body, Mapping):
            return self.error_response(400, "The request body must be a JSON object.")
        for name in ("model", "messages"):
            if name not in body:
                return self.error_response(400, f"Field required: {name}", param=name)
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            return self.error_response(
                400, "messages must be a non-empty list of messages", param="messages"
            )
        if not all(isinstance(m, Mapping) and "role" in m for m in messages):
            return self.error_response(400, "every message needs a role", param="messages")
        if body.get("stream"):
            return self.error_response(
                400, "the fake vLLM does not implement streaming", param="stream"
            )
        if (body.get("n") or 1) != 1:
            return self.error_response(400, "the fake vLLM only supports n=1", param="n")
        if self.check_model and body["model"] != self.model:
            return self.error_response(
                404, f"The model `{body['model']}` does not exist.", param="model"
            )
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
        body = {
            "error": {
                "message": message,
                "type": type or _default_error_type(status),
                "param": param,
                "code": None,
            }
        }
        return JSONResponse(body, status_code=status, headers=retry_after_header(retry_after_s))

    def answer(self, body: Mapping[str, Any], action: Answer | Invalid | Truncated) -> Response:
        rng = rng_for(body)
        output = produce(action, request_schema(body), rng)
        completion_tokens = count_tokens(output.text)
        prompt_tokens = count_tokens(json.dumps(body["messages"]))
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        if isinstance(action, Answer) and action.usage:
            usage.update(action.usage)
            if "total_tokens" not in action.usage:
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        usage["prompt_tokens_details"] = self.prompt_tokens_details(usage["prompt_tokens"])
        logprobs = None
        if body.get("logprobs"):
            mean = action.mean_logprob if isinstance(action, Answer) else Answer().mean_logprob
            top_n = int(body.get("top_logprobs") or 0)
            logprobs = {
                "content": token_logprobs(split_tokens(output.text), mean, rng, top_n),
                "refusal": None,
            }
        completion = {
            "id": new_id("chatcmpl-", 32),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": output.text,
                        "refusal": None,
                        "tool_calls": [],
                        "reasoning_content": None,
                    },
                    "logprobs": logprobs,
                    "finish_reason": output.finish_reason,
                    "stop_reason": None,
                }
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage,
            "prompt_logprobs": None,
        }
        return JSONResponse(completion, headers={"x-request-id": completion["id"]})

    def prompt_tokens_details(self, prompt_tokens: int) -> dict[str, int] | None:
        """`usage.prompt_tokens_details` (vLLM: none unless asked for)."""
        return None

    # --- other endpoints ---------------------------------------------------------------

    async def _models(self, request: Request) -> Response:
        card = {
            "id": self.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
            "max_model_len": 8192,
            "permission": [],
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def _metrics(self, request: Request) -> Response:
        label = self.model.replace("\\", "\\\\").replace('"', '\\"')
        gauges = [
            (
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
                self.in_flight,
            ),
            (
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
                self.waiting,
            ),
        ]
        lines: list[str] = []
        for metric, help_text, value in gauges:
            lines += [
                f"# HELP {metric} {help_text}",
                f"# TYPE {metric} gauge",
                f'{metric}{{model_name="{label}"}} {float(value)!r}',
            ]
        return PlainTextResponse(
            "\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def _health(self, request: Request) -> Response:
        return Response(status_code=200)


def request_schema(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The JSON Schema a vLLM request constrains its output to, if any."""
    fmt = body.get("response_format")
    if isinstance(fmt, Mapping):
        if fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema") or {}
            schema = spec.get("schema") if isinstance(spec, Mapping) else None
            return schema if isinstance(schema, Mapping) else {}
        if fmt.get("type") == "json_object":
            return _JSON_OBJECT_SCHEMA
    structured = body.get("structured_outputs")
    if isinstance(structured, Mapping) and structured.get("json") is not None:
        return _as_schema(structured["json"])
    if body.get("guided_json") is not None:
        return _as_schema(body["guided_json"])
    return None


def _as_schema(value: Any) -> Mapping[str, Any]:
    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, Mapping) else {}


def token_logprobs(
    tokens: list[str], mean: float, rng: random.Random, top_n: int = 0
) -> list[dict[str, Any]]:
    """One `ChatCompletionTokenLogprob` per token; the logprobs vary around `mean` (same
    sign) and average to exactly `mean`."""
    if not tokens:
        return []
    jitter = [rng.uniform(-0.5, 0.5) for _ in tokens]
    centre = sum(jitter) / len(jitter)
    values = [mean * (1.0 + j - centre) for j in jitter]
    values[-1] += mean * len(values) - sum(values)  # absorb the rounding error
    entries = []
    for token, logprob in zip(tokens, values, strict=True):
        top = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]
        top += [
            {"token": f" alt{i}", "logprob": logprob - 1.0 - i, "bytes": list(f" alt{i}".encode())}
            for i in range(1, top_n)
        ]
        entries.append(
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode()),
                "top_logprobs": top[:top_n],
            }
        )
    return entries


def _default_error_type(status: int) -> str:
    """vLLM names error types after the status: 400 "BadRequestError", 404 "NotFoundError"."""
    try:
        phrase = HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        return "Error"
    return phrase if phrase.endswith("Error") else f"{phrase}Error"


class FakeOpenAI(FakeVLLM):
    """A fake of OpenAI's API. Attributes: `api_key` (when set, a request without
    `Authorization: Bearer <api_key>` gets OpenAI's 401), `cached_tokens` (reported in
    `usage.prompt_tokens_details.cached_tokens`, at most the prompt; `reset()` sets 0)."""

    name = "fake-openai"

    def __init__(
        self, *, model: str = "gpt-4o-mini", api_key: str | None = None, latency_s: float = 0.0
    ) -> None:
        super().__init__(model=model, latency_s=latency_s)
        self.api_key = api_key
        self.cached_tokens = 0

    def _reset_state(self) -> None:
        super()._reset_state()
        self.cached_tokens = 0

    def validate(self, request: Request, body: Any) -> Response | None:
        bearer = request.headers.get("authorization")
        if self.api_key is not None and bearer != f"Bearer {self.api_key}":
            return self.error_response(
                401,
                "Incorrect API key provided. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                type="invalid_request_error",
            )
        rejected = super().validate(request, body)
        if rejected is not None:
            return rejected
        fmt = body.get("response_format")
        if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema") or {}
            if spec.get("strict"):
                problem = strict_problem(spec.get("schema"), ())
                if problem is not None:
                    return self.error_response(
                        400,
                        f"Invalid schema for response_format '{spec.get('name')}': {problem}",
                        type="invalid_request_error",
                        param="response_format",
                    )
        return None

    def prompt_tokens_details(self, prompt_tokens: int) -> dict[str, int] | None:
        return {"cached_tokens": min(self.cached_tokens, prompt_tokens), "audio_tokens": 0}


def strict_problem(schema: Any, where: tuple[str, ...]) -> str | None:
    """What OpenAI's strict mode refuses in `schema` (the rules it checks most often)."""
    if not isinstance(schema, Mapping):
        return f"In context={where}, schema must be a JSON Schema object."
    if not where and schema.get("type") != "object":
        return "schema must be a JSON Schema of 'type: \"object\"'."
    for word in ("allOf", "oneOf", "not", "if", "then", "else", "patternProperties"):
        if word in schema:
            return f"In context={where}, '{word}' is not permitted."
    props = schema.get("properties")
    if schema.get("type") == "object" or props is not None:
        if schema.get("additionalProperties") is not False:
            return (
                f"In context={where}, 'additionalProperties' is required to be supplied "
                "and to be false."
            )
        missing = [k for k in props or {} if k not in (schema.get("required") or [])]
        if missing:
            return (
                f"In context={where}, 'required' is required to be supplied and to be an "
                f"array including every key in properties. Missing '{missing[0]}'."
            )
    children: list[tuple[tuple[str, ...], Any]] = [
        ((*where, "properties", k), v) for k, v in (props or {}).items()
    ]
    if "items" in schema:
        children.append(((*where, "items"), schema["items"]))
    children += [((*where, "anyOf", str(i)), v) for i, v in enumerate(schema.get("anyOf", []))]
    children += [((*where, "$defs", k), v) for k, v in (schema.get("$defs") or {}).items()]
    for place, child in children:
        problem = strict_problem(child, place)
        if problem is not None:
            return problem
    return None
