"""OpenAI's batch file format, read as tierfleet jobs and written back as results.

A request line, as the OpenAI Batch API (and vLLM's `run-batch`) reads it:

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [...], "max_tokens": 64,
              "response_format": {"type": "json_schema", "json_schema": {"schema": {...}}}}}

becomes a job envelope: the messages (system and developer messages as `system`),
`max_tokens` (or `max_completion_tokens`), `temperature`, the response format's JSON
Schema as `output_schema` (`json_object`: any object), and the `custom_id` in
`metadata`. The model is the fleet's to choose: `model` is read and not used. Fields that
would change what an answer is (`n` above 1, `tools`, `stream`, ...) are refused, naming
the field. The job's answer goes back as OpenAI's result line (`result_line`), or its
failure as an error line (`error_line`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from tierfleet.errors import InvalidEnvelope

ENDPOINT = "/v1/chat/completions"
MAX_CUSTOM_ID = 200
# Read and not used: the fleet picks the model; the rest do not change what an answer is.
_IGNORED = frozenset({
    "model", "user", "seed", "store", "metadata", "service_tier", "top_p",
    "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs", "n",
    "parallel_tool_calls",
})  # fmt: skip
_USED = frozenset({"messages", "max_tokens", "max_completion_tokens", "temperature",
                   "response_format"})  # fmt: skip


def is_request(data: Mapping[str, Any]) -> bool:
    """Is this JSONL object an OpenAI batch request line (not a tierfleet envelope)?"""
    return "custom_id" in data and "body" in data


def to_envelope(data: Mapping[str, Any]) -> dict[str, Any]:
    """The job envelope of one request line; `InvalidEnvelope` names the field."""
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID:
        raise InvalidEnvelope(
            f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters", field="custom_id"
        )
    if data.get("method", "POST") != "POST":
        raise InvalidEnvelope(f"method must be POST, not {data.get('method')!r}", field="method")
    if data.get("url", ENDPOINT) != ENDPOINT:
        raise InvalidEnvelope(
            f"url must be {ENDPOINT} (the one endpoint a batch runs), not {data.get('url')!r}",
            field="url",
        )
    extra = set(data) - {"custom_id", "method", "url", "body"}
    if extra:
        raise InvalidEnvelope(f"unknown field {sorted(extra)[0]!r}", field=sorted(extra)[0])
    body = data["body"]
    if not isinstance(body, Mapping):
        raise InvalidEnvelope("body must be an object (the chat completion request)", field="body")
    for name in body:
        if name in _USED or name in _IGNORED:
            continue
        raise InvalidEnvelope(
            f"body.{name} is not supported by tierfleet (supported: "
            f"{', '.join(sorted(_USED))}; read and not used: model and sampling options)",
            field=f"body.{name}",
        )
    if body.get("n", 1) != 1:
        raise InvalidEnvelope("body.n must be 1: one answer a request", field="body.n")
    envelope: dict[str, Any] = {"metadata": {"custom_id": custom_id}}
    system, messages = _messages(body.get("messages"))
    envelope["messages"] = messages
    if system:
        envelope["system"] = system
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        envelope["max_tokens"] = limit
    if "temperature" in body:
        envelope["temperature"] = body["temperature"]
    schema = _output_schema(body.get("response_format"))
    if schema is not None:
        envelope["output_schema"] = schema
    return envelope


def _messages(raw: Any) -> tuple[str, list[dict[str, str]]]:
    if not isinstance(raw, list) or not raw:
        raise InvalidEnvelope("body.messages must be a non-empty array", field="body.messages")
    system: list[str] = []
    out: list[dict[str, str]] = []
    for i, message in enumerate(raw):
        where = f"body.messages[{i}]"
        if not isinstance(message, Mapping):
            raise InvalidEnvelope(f"{where} must be an object", field=where)
        role, content = message.get("role"), _text(message.get("content"), f"{where}.content")
        if role in ("system", "developer"):
            system.append(content)
        elif role in ("user", "assistant"):
            out.append({"role": role, "content": content})
        else:
            raise InvalidEnvelope(
                f"{where}.role must be system, developer, user or assistant, not {role!r}",
                field=f"{where}.role",
            )
    if not out:
        raise InvalidEnvelope("body.messages has no user message", field="body.messages")
    return "\n\n".join(system), out


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):  # fmt: skip
                raise InvalidEnvelope(
                    f"{where}[{i}]: only text parts are supported", field=f"{where}[{i}]"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidEnvelope(f"{where} must be a string or an array of text parts", field=where)


def _output_schema(fmt: Any) -> dict[str, Any] | None:
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, dict):
            raise InvalidEnvelope(
                "body.response_format.json_schema.schema must be a JSON Schema object",
                field="body.response_format.json_schema.schema",
            )
        return schema
    raise InvalidEnvelope(
        "body.response_format.type must be text, json_object or json_schema",
        field="body.response_format.type",
    )


def result_line(
    *,
    custom_id: str,
    job_id: str,
    result: Any,
    model: str,
    input_tokens: int,
    output_tokens: int,
    finished_at: float | None,
    extra: Mapping[str, Any],
) -> bytes:
    """A job's answer as OpenAI's batch output line (a `chat.completion` body)."""
    content = result if isinstance(result, str) else orjson.dumps(result).decode()
    completion = {
        "id": f"chatcmpl-{job_id}", "object": "chat.completion",
        "created": int(finished_at or time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": input_tokens, "completion_tokens": output_tokens,
                  "total_tokens": input_tokens + output_tokens},
        "tierfleet": dict(extra),
    }  # fmt: skip
    line = {"id": f"batch_req_{job_id}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": job_id, "body": completion},
            "error": None}  # fmt: skip
    return orjson.dumps(line) + b"\n"


def error_line(*, custom_id: str, job_id: str, status: str, error: str | None) -> bytes:
    """A job that ended without an answer, as OpenAI's batch error line."""
    code = "job_cancelled" if status == "cancelled" else "job_failed"
    line = {"id": f"batch_req_{job_id}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": error or status}}  # fmt: skip
    return orjson.dumps(line) + b"\n"
