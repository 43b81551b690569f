"""The small tier: Llama 3 8B behind vLLM's OpenAI-compatible server, via the `openai` SDK.

A job with an output schema asks for schema-constrained decoding (`response_format` of
type `json_schema`: vLLM's structured outputs), so the answer parses by construction; token
logprobs are requested and their mean is recorded on the attempt. Imported only by a
worker that serves the small tier.
"""

from __future__ import annotations

import re
from typing import Any

import httpx2
import openai
from openai.types.chat import ChatCompletion
from prometheus_client.parser import text_string_to_metric_families

from tierfleet.envelope import JobSpec
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

PROVIDER = "vllm"


class VLLMBackend:
    """A `ModelBackend` for one vLLM server. Thread-safe: one client, pooled connections
    (sized for the worker's concurrency), shared by every worker thread."""

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        tier: str = "slm",
        max_connections: int = 64,
        api_key: str | None = None,
        provider: str = PROVIDER,  # "openai" on an openai tier: what its attempts are booked as
    ) -> None:
        self.tier = tier
        self.model = model
        self.provider = provider
        self.base_url = base_url
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=api_key or "EMPTY",
            max_retries=0,  # the escalation policy owns retries
            http_client=pooled_client(max_connections),
        )

    def __repr__(self) -> str:
        return f"VLLMBackend(base_url={self.base_url!r}, model={self.model!r})"

    def complete(self, job: JobSpec, *, timeout_s: float) -> Completion:
        with sdk_faults(self.provider, openai, timeout_s):
            response = self._client.chat.completions.create(
                model=self.model,
                messages=_messages(job),  # type: ignore[arg-type]
                max_tokens=job.max_tokens,
                temperature=job.temperature,
                logprobs=True,
                timeout=timeout_s,
                **_response_format(job),
            )
        return read_completion(response)

    def close(self) -> None:
        self._client.close()


def read_completion(response: Any) -> Completion:
    """The answer in a chat completion. A body without one (no choices, no message, a
    count or logprob that is not a number) is a malformed response, never billed. A
    completion without `usage` is an answer whose tokens are unknown: it costs 0."""
    expect(PROVIDER, response, ChatCompletion, "a chat completion")
    message = field(PROVIDER, response, "choices.0.message")
    content = getattr(message, "content", None)
    if content is not None and not isinstance(content, str):
        raise malformed_fault(PROVIDER, f"choices.0.message.content is {type(content).__name__}")
    choice = field(PROVIDER, response, "choices.0")
    usage = Usage()
    if response.usage is not None:
        usage = Usage(
            input_tokens=token_count(PROVIDER, response, "usage.prompt_tokens"),
            output_tokens=token_count(PROVIDER, response, "usage.completion_tokens"),
        )
    values: list[float] = []
    for token in getattr(getattr(choice, "logprobs", None), "content", None) or []:
        value = getattr(token, "logprob", None)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise malformed_fault(PROVIDER, "choices.0.logprobs has a token without a logprob")
        values.append(float(value))
    return Completion(
        text=content or "",
        usage=usage,
        finish_reason=str(getattr(choice, "finish_reason", None) or "stop"),
        mean_logprob=sum(values) / len(values) if values else None,
    )


def _messages(job: JobSpec) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": job.system}] if job.system else []
    return messages + [dict(m) for m in job.messages]


def _response_format(job: JobSpec) -> dict[str, Any]:
    if job.output_schema is None:
        return {}
    name = re.sub(r"[^A-Za-z0-9_-]", "_", job.output_schema_name or "output")[:64]
    return {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": dict(job.output_schema), "strict": True},
        }
    }


def read_vllm_metrics(base_url: str, *, timeout_s: float = 2.0) -> dict[str, float]:
    """vLLM's queue gauges from its Prometheus `/metrics` (served at the server root):
    `{"waiting": ..., "running": ...}`, summed over models."""
    root = re.sub(r"/v1/?$", "", base_url.rstrip("/"))
    response = httpx2.get(f"{root}/metrics", timeout=timeout_s)
    response.raise_for_status()
    wanted = {"vllm:num_requests_waiting": "waiting", "vllm:num_requests_running": "running"}
    out = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(response.text):
        key = wanted.get(family.name)
        if key is None:
            continue
        out[key] += sum(sample.value for sample in family.samples)
    return out
