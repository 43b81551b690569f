"""A rung on OpenAI's API, or on any OpenAI-compatible server (Ollama, llama.cpp, SGLang,
TGI, ...), through the official `openai` SDK (Chat Completions).

- The key comes from the tier's `api_key_env` (OPENAI_API_KEY by default) and the URL from
  its `base_url` or OPENAI_BASE_URL; with neither URL the SDK's default, OpenAI's API.
- Output schemas go as `response_format` of type `json_schema`. OpenAI decodes *strictly*
  (the answer matches the schema by construction) only for a subset of JSON Schema: the
  root an object; every object closed (`additionalProperties: false`) with every property
  in `required`; no `allOf`, `oneOf`, `not`, `if`/`then`/`else`, `dependent*`,
  `patternProperties`, ...; at most 10 levels and 5,000 properties. `strict_schema` makes
  the copy it needs: objects that say nothing about extra properties are closed (an answer
  without extras is still valid), keywords strict mode does not take that only narrow a
  value (`minLength`, `uniqueItems`, ...) are left out of the copy (the validator checks
  them on the answer). A schema that cannot be strict without changing what it accepts
  (an optional property, an open object, a composition) is sent as it is, with
  `strict: false`: the model follows it as guidance and the validator decides.
- On OpenAI's API the root of a schema must be an object: a job's array (or string, ...)
  schema is wrapped as the one property `value` of an object, and the answer unwrapped.
- Token logprobs are asked for only when the tier says so (`logprobs = true`).
- Usage: OpenAI counts cached prompt tokens inside `prompt_tokens` and reports them in
  `prompt_tokens_details.cached_tokens`; they are booked as cache reads (priced with the
  model's cache-read multiplier) and the rest as input.
- The SDK's retries are off; the escalation policy owns retries (`faults.py`).

Attempts are booked with provider `openai` on every `openai` rung, a compatible server's
too (the tier names the server, the model its model). `vllm.py` is this backend plus
vLLM's own parts. Imported only by a worker that serves an
`openai` or `vllm` rung.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Final

import openai
from openai.types.chat import ChatCompletion

from tierfleet.envelope import JobSpec
from tierfleet.fleet import is_openai_api
from tierfleet.prices import Usage
from workers.backends.base import Completion
from workers.backends.faults import (
    expect,
    field,
    malformed_fault,
    pooled_client,
    sdk_faults,
    token_count,
)

PROVIDER = "openai"
NO_KEY = "EMPTY"  # what a server that checks no key is sent (the SDK insists on one)
MAX_DEPTH: Final = 10  # OpenAI's strict-mode limits
MAX_PROPERTIES: Final = 5000
WRAPPED: Final = "value"  # the property a non-object schema is wrapped in, on OpenAI's API


class OpenAIBackend:
    """A `ModelBackend` for one OpenAI-compatible endpoint. Thread-safe: one client,
    pooled connections (sized for the worker's concurrency), shared by every thread."""

    provider: str = PROVIDER
    cache_reads = True  # book `prompt_tokens_details.cached_tokens` as cache reads

    def __init__(
        self,
        *,
        model: str,
        tier: str,
        base_url: str | None = None,
        api_key: str | None = None,
        logprobs: bool = False,
        max_connections: int = 64,
        official: bool | None = None,
    ) -> None:
        """`official`: whether the endpoint speaks as OpenAI's own API does (a gateway in
        front of it, say); None: whether `base_url` is OpenAI's."""
        self.tier = tier
        self.model = model
        self.base_url = base_url
        self.logprobs = logprobs
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=api_key or NO_KEY,
            max_retries=0,  # the escalation policy owns retries
            http_client=pooled_client(max_connections),
        )
        # OpenAI's own API has replaced `max_tokens` (refused by its reasoning models);
        # the compatible servers all know `max_tokens`, not all the new name.
        official = is_openai_api(base_url) if official is None else official
        self._max_tokens_key = "max_completion_tokens" if official else "max_tokens"
        self._wraps = official  # OpenAI's API takes only an object at a schema's root

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r})"

    def complete(self, job: JobSpec, *, timeout_s: float) -> Completion:
        request = self.build_request(job)
        with sdk_faults(self.provider, openai, timeout_s):
            response = self._client.chat.completions.create(**request, timeout=timeout_s)
        completion = read_completion(response, provider=self.provider, cache_reads=self.cache_reads)
        if self._wrapped(job):
            completion = replace(completion, text=unwrap(completion.text))
        return completion

    def build_request(self, job: JobSpec) -> dict[str, Any]:
        """The `chat.completions.create` arguments for `job`."""
        request: dict[str, Any] = {
            "model": self.model,
            "messages": chat_messages(job),
            self._max_tokens_key: job.max_tokens,
            "temperature": job.temperature,
        }
        if self.logprobs:
            request["logprobs"] = True
        return request | self.response_format(job)

    def response_format(self, job: JobSpec) -> dict[str, Any]:
        """`response_format` for the job's output schema: strict where it can be."""
        if job.output_schema is None:
            return {}
        original = dict(job.output_schema)
        if self._wrapped(job):
            original = {"type": "object", "properties": {WRAPPED: original}, "required": [WRAPPED]}
        strict = strict_schema(original)
        schema = strict if strict is not None else original
        return json_schema_format(job, schema, strict=strict is not None)

    def _wrapped(self, job: JobSpec) -> bool:
        schema = job.output_schema
        return self._wraps and schema is not None and schema.get("type") != "object"

    def close(self) -> None:
        self._client.close()


def unwrap(text: str) -> str:
    """The answer inside a wrapped one (`{"value": ...}`); anything else is left as it
    is, for the validator to refuse."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, dict) and set(value) == {WRAPPED}:
        return json.dumps(value[WRAPPED])
    return text


def chat_messages(job: JobSpec) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": job.system}] if job.system else []
    return messages + [dict(m) for m in job.messages]


def json_schema_format(job: JobSpec, schema: Mapping[str, Any], *, strict: bool) -> dict[str, Any]:
    name = re.sub(r"[^A-Za-z0-9_-]", "_", job.output_schema_name or "output")[:64]
    return {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": dict(schema), "strict": strict},
        }
    }


# --- strict mode ---------------------------------------------------------------------------

# Keywords strict mode takes (OpenAI, Structured Outputs: supported schemas).
_STRICT_KEYWORDS: Final = frozenset(
    {
        "type", "description", "title", "enum", "const", "anyOf", "$ref", "$defs",
        "definitions", "properties", "required", "additionalProperties", "items",
        "minItems", "maxItems", "pattern", "format", "multipleOf", "minimum", "maximum",
        "exclusiveMinimum", "exclusiveMaximum",
    }
)  # fmt: skip
# Keywords that only say something about the value, left out of the strict copy: the
# validator still applies them to the answer.
_DROPPABLE: Final = frozenset(
    {
        "$schema", "$id", "$comment", "default", "examples", "deprecated", "readOnly",
        "writeOnly", "minLength", "maxLength", "uniqueItems", "minProperties",
        "maxProperties", "contentEncoding", "contentMediaType",
    }
)  # fmt: skip


class _NotStrict(Exception):
    """The schema cannot be decoded strictly without changing what it accepts."""


def strict_schema(schema: Mapping[str, Any]) -> dict[str, Any] | None:
    """The copy of `schema` that OpenAI's strict mode takes, or None when there is none
    that accepts the same answers (see the module docstring)."""
    if schema.get("type") != "object":
        return None
    out = copy.deepcopy(dict(schema))
    counter = [0]
    try:
        _tighten(out, depth=0, properties=counter)
    except _NotStrict:
        return None
    return out


def _tighten(node: Any, *, depth: int, properties: list[int]) -> None:
    if not isinstance(node, dict):
        raise _NotStrict
    if depth > MAX_DEPTH:
        raise _NotStrict
    for key in [k for k in node if k in _DROPPABLE]:
        del node[key]
    if set(node) - _STRICT_KEYWORDS:
        raise _NotStrict
    ref = node.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#/")):
        raise _NotStrict
    types = node.get("type")
    is_object = types == "object" or (isinstance(types, list) and "object" in types)
    if is_object or "properties" in node:
        props = node.get("properties", {})
        if not isinstance(props, dict):
            raise _NotStrict
        if node.setdefault("additionalProperties", False) is not False:
            raise _NotStrict
        if set(node.get("required", [])) != set(props):
            raise _NotStrict  # an optional property: strict mode makes every one required
        node["required"] = list(props)
        properties[0] += len(props)
        if properties[0] > MAX_PROPERTIES:
            raise _NotStrict
        for child in props.values():
            _tighten(child, depth=depth + 1, properties=properties)
    if "items" in node:
        _tighten(node["items"], depth=depth + 1, properties=properties)
    for child in node.get("anyOf", []):
        _tighten(child, depth=depth + 1, properties=properties)
    for group in ("$defs", "definitions"):
        for child in node.get(group, {}).values():
            _tighten(child, depth=depth + 1, properties=properties)


# --- reading answers ---------------------------------------------------------------------


def read_completion(
    response: Any, *, provider: str = PROVIDER, cache_reads: bool = True
) -> Completion:
    """The answer in a chat completion. A body without one (no choices, no message, a
    count or logprob that is not a number) is a malformed response, never billed. A
    completion without `usage` is an answer whose tokens are unknown: it costs 0."""
    expect(provider, response, ChatCompletion, "a chat completion")
    message = field(provider, response, "choices.0.message")
    content = getattr(message, "content", None)
    if content is not None and not isinstance(content, str):
        raise malformed_fault(provider, f"choices.0.message.content is {type(content).__name__}")
    choice = field(provider, response, "choices.0")
    usage = Usage()
    if response.usage is not None:
        prompt = token_count(provider, response, "usage.prompt_tokens")
        cached = 0
        if cache_reads:
            path = "usage.prompt_tokens_details.cached_tokens"
            cached = token_count(provider, response, path, required=False)
            if cached > prompt:
                raise malformed_fault(provider, f"{path} is {cached}, above prompt_tokens")
        usage = Usage(
            input_tokens=prompt - cached,
            output_tokens=token_count(provider, response, "usage.completion_tokens"),
            cache_read_tokens=cached,
        )
    values: list[float] = []
    for token in getattr(getattr(choice, "logprobs", None), "content", None) or []:
        value = getattr(token, "logprob", None)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise malformed_fault(provider, "choices.0.logprobs has a token without a logprob")
        values.append(float(value))
    return Completion(
        text=content or "",
        usage=usage,
        finish_reason=str(getattr(choice, "finish_reason", None) or "stop"),
        mean_logprob=sum(values) / len(values) if values else None,
    )
