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
from prometheus_client.parser import text_string_to_metric_families

from tierfleet.envelope import JobSpec
from tierfleet.prices import Usage
from workers.backends.base import Completion
from workers.backends.faults import pooled_client, sdk_faults

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
    ) -> None:
        self.tier = tier
        self.model = model
        self.provider = PROVIDER
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
        with sdk_faults(PROVIDER, openai, timeout_s):
            response = self._client.chat.completions.create(
                model=self.model,
                messages=_messages(job),  # type: ignore[arg-type]
                max_tokens=job.max_tokens,
                temperature=job.temperature,
                logprobs=True,
                timeout=timeout_s,
                **_response_format(job),
            )
        choice = response.choices[0]
        usage = response.usage
        tokens = choice.logprobs.content if choice.logprobs and choice.logprobs.content else []
        return Completion(
            text=choice.message.content or "",
            usage=Usage(
                input_tokens=usage.prompt_tokens if usage else 0,
                output_tokens=usage.completion_tokens if usage else 0,
            ),
            finish_reason=choice.finish_reason or "stop",
            mean_logprob=sum(t.logprob for t in tokens) / len(tokens) if tokens else None,
        )

    def close(self) -> None:
        self._client.close()


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
