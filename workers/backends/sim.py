"""Simulated model backends: deterministic stand-ins for vLLM and Claude.

Clearly labelled as simulated (provider `sim-vllm` / `sim-anthropic`). For a given seed,
job id and tier, the latency, the token counts and whether the answer is valid are always
the same. Answers to jobs with an output schema are built from the schema; a share of
small-tier answers (`TIERFLEET_SIM_INVALID_RATE`) are wrong in the ways small models are
wrong: prose around the JSON, a missing required field, an answer cut off at max_tokens.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Mapping
from typing import Any

import rstr

from tierfleet.envelope import JobSpec
from tierfleet.errors import ProviderTimeout
from tierfleet.prices import Usage
from tierfleet.schema_guard import pattern_search
from workers.backends.base import Completion

_WORDS = [
    "the",
    "customer",
    "reports",
    "the",
    "order",
    "arrived",
    "late",
    "and",
    "the",
    "invoice",
    "total",
    "looks",
    "wrong;",
    "we",
    "recommend",
    "a",
    "refund",
    "of",
    "the",
    "shipping",
    "fee",
    "and",
    "a",
    "follow-up",
    "within",
    "two",
    "days",
]


class SimulatedBackend:
    """A `ModelBackend` that sleeps for its latency and makes up a plausible answer."""

    def __init__(
        self,
        *,
        tier: str,
        model: str,
        mean_latency_s: float,
        invalid_rate: float,
        seed: int = 0,
    ) -> None:
        self.tier = tier
        self.model = model
        self.provider = "sim-vllm" if tier == "slm" else "sim-anthropic"
        self.mean_latency_s = mean_latency_s
        self.invalid_rate = invalid_rate
        self.seed = seed

    def _rng(self, job: JobSpec) -> random.Random:
        content = json.dumps(job.payload(), sort_keys=True)
        digest = hashlib.sha256(f"{self.seed}:{self.tier}:{content}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def complete(self, job: JobSpec, *, timeout_s: float) -> Completion:
        rng = self._rng(job)
        latency_s = self.mean_latency_s * rng.uniform(0.5, 1.5)
        invalid = rng.random() < self.invalid_rate
        if latency_s > timeout_s:
            time.sleep(timeout_s)
            raise ProviderTimeout(f"simulated {self.tier} call exceeded {timeout_s:.1f}s")
        if latency_s:
            time.sleep(latency_s)

        finish_reason = "stop"
        if job.output_schema is not None:
            answer = example_instance(job.output_schema, rng)
            text = json.dumps(answer)
            if invalid:
                text, finish_reason = _corrupt(answer, text, job.output_schema, rng)
        else:
            text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(20, 60)))
            if invalid:
                finish_reason = "length"
        output_tokens = min(job.max_tokens, max(1, len(text) // 4))
        usage = Usage(input_tokens=job.estimated_prompt_tokens, output_tokens=output_tokens)
        logprob = -rng.uniform(0.05, 0.6) if self.tier == "slm" else None
        return Completion(text=text, usage=usage, finish_reason=finish_reason, mean_logprob=logprob)


def _corrupt(
    answer: Any, text: str, schema: Mapping[str, Any], rng: random.Random
) -> tuple[str, str]:
    """One of the ways a small model gets structured output wrong."""
    required = schema.get("required") or []
    choice = rng.randrange(3)
    if choice == 0 and isinstance(answer, dict) and required:
        broken = {k: v for k, v in answer.items() if k != required[0]}
        return json.dumps(broken), "stop"
    if choice == 1:
        return f"Sure! Here is the JSON you asked for:\n{text}", "stop"
    return text[: max(1, len(text) // 2)], "length"


def example_instance(schema: Mapping[str, Any], rng: random.Random, depth: int = 0) -> Any:
    """A value that satisfies `schema`, for the common JSON Schema keywords."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(list(schema["enum"]))
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return example_instance(schema[key][0], rng, depth + 1)
    if "allOf" in schema:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            merged.update(part)
        return example_instance(merged, rng, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props: Mapping[str, Any] = schema.get("properties", {})
        keys = list(schema.get("required", [])) + [k for k in props if depth < 3]
        return {k: example_instance(props.get(k, {}), rng, depth + 1) for k in dict.fromkeys(keys)}
    if kind == "array":
        item = schema.get("items", {})
        low = schema.get("minItems", 1)
        high = max(low, min(schema.get("maxItems", 3), 3))
        items = [example_instance(item, rng, depth + 1) for _ in range(rng.randint(low, high))]
        if schema.get("uniqueItems"):
            unique = {json.dumps(i, sort_keys=True): i for i in items}
            items = list(unique.values())
        return items
    if kind in ("number", "integer"):
        return _number(schema, rng, integer=kind == "integer")
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return _string(schema, rng)


def _number(schema: Mapping[str, Any], rng: random.Random, *, integer: bool) -> float | int:
    low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
    high = schema.get("maximum", schema.get("exclusiveMaximum", low + 100))
    if integer:
        return rng.randint(
            int(low) + ("exclusiveMinimum" in schema), int(high) - ("exclusiveMaximum" in schema)
        )
    return round(rng.uniform(low, high), 2) if high > low else low


def _string(schema: Mapping[str, Any], rng: random.Random) -> str:
    fmt = schema.get("format")
    if fmt == "date":
        return f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if fmt == "date-time":
        return "2024-03-01T12:00:00Z"
    if fmt == "email":
        return "jane.doe@example.com"
    low, high = schema.get("minLength", 1), schema.get("maxLength", 80)
    if "pattern" in schema:
        for _ in range(20):
            candidate = rstr.Rstr(rng).xeger(schema["pattern"])
            if pattern_search(schema["pattern"], candidate) and low <= len(candidate) <= high:
                return candidate
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 8)))
    words = words[:high]
    return words if len(words) >= low else words.ljust(low, "x")
