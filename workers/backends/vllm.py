"""A rung on vLLM (by default the small tier: Llama 3 8B): the `openai` backend plus vLLM's
own parts.

- Structured outputs: vLLM constrains decoding to the *whole* JSON Schema (its grammar
  backends take the keywords OpenAI's strict mode refuses, optional properties included),
  so the job's schema is sent as it is, `strict: true`, and the answer parses by
  construction.
- Token logprobs are asked for by default (the tier's `logprobs`), and their mean is
  recorded on the attempt.
- Usage is booked as vLLM reports it: `prompt_tokens` all as input (prefix-cache hits are
  the GPU's own business, priced in its hourly cost).
- `/metrics`: the server's Prometheus queue gauges, read by `tierfleet depth`.

Imported only by a worker that serves a vLLM rung.
"""

from __future__ import annotations

import re
from typing import Any

import httpx2
from prometheus_client.parser import text_string_to_metric_families

from tierfleet.envelope import JobSpec
from workers.backends import openai_api
from workers.backends.base import Completion
from workers.backends.openai_api import OpenAIBackend, chat_messages, json_schema_format

PROVIDER = "vllm"


class VLLMBackend(OpenAIBackend):
    """A `ModelBackend` for one vLLM server (an `OpenAIBackend` with vLLM's structured
    outputs and usage). Thread-safe: one client shared by every worker thread."""

    provider = PROVIDER
    cache_reads = False

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        tier: str = "slm",
        max_connections: int = 64,
        api_key: str | None = None,
        logprobs: bool = True,
    ) -> None:
        super().__init__(
            model=model,
            tier=tier,
            base_url=base_url,
            api_key=api_key,
            logprobs=logprobs,
            max_connections=max_connections,
        )

    def response_format(self, job: JobSpec) -> dict[str, Any]:
        return _response_format(job)


def read_completion(response: Any) -> Completion:
    """A vLLM chat completion read as `openai_api.read_completion` reads one."""
    return openai_api.read_completion(response, provider=PROVIDER, cache_reads=False)


def _messages(job: JobSpec) -> list[dict[str, str]]:
    return chat_messages(job)


def _response_format(job: JobSpec) -> dict[str, Any]:
    if job.output_schema is None:
        return {}
    return json_schema_format(job, job.output_schema, strict=True)


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
