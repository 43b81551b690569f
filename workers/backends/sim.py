"""Simulated model backends: deterministic stand-ins for the models of a ladder.

Clearly labelled as simulated (provider `sim-vllm`, `sim-anthropic`, `sim-openai`: `sim-`
and the backend the tier stands in for). For a given seed, job content and tier, the
latency, the token counts and whether the answer is valid are always the same. Answers to
jobs with an output schema are built from the schema; invalid ones are wrong in the ways
small models are wrong: prose around the JSON, a missing required field, an answer cut
off at max_tokens.

How often a rung answers invalidly depends on the rung and the kind of job:

- the rung's rate: `TIERFLEET_SIM_INVALID_RATE` on the bottom rung,
  `TIERFLEET_SIM_FRONTIER_INVALID_RATE` on the top, in a straight line between for the
  rungs in the middle (`rung_invalid_rate`);
- the kind (`metadata.kind`) scales the odds of that rate (`KIND_ODDS`): mechanical work
  (classification, extraction) fails less, reasoning and code much more, so they fail
  most on the low rungs; a job of another kind, or none, fails at the rung's rate. A rate
  of 0 or 1 stays 0 or 1 for every kind.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Mapping
from typing import Any, Final

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


# How much harder than ordinary work (a short summary, or a job with no kind) each kind
# of job is for a model: the factor on the odds of an invalid answer.
KIND_ODDS: Final[Mapping[str, float]] = {
    "classification": 0.35,
    "extraction": 0.5,
    "summary": 1.0,
    "reasoning": 6.0,
    "code": 8.0,
}


def rung_invalid_rate(bottom: float, top: float, position: int, rungs: int) -> float:
    """The rate of rung `position` (0: the bottom) of a ladder of `rungs`: `bottom` on
    the bottom rung, `top` on the top one (a ladder of one rung is its top), in a straight
    line between."""
    if position >= rungs - 1:
        return top
    return bottom + (top - bottom) * position / (rungs - 1)


def invalid_chance(rate: float, kind: object, odds: Mapping[str, float] = KIND_ODDS) -> float:
    """The chance of an invalid answer to a job of `kind` on a rung of `rate`."""
    factor = odds.get(kind, 1.0) if isinstance(kind, str) else 1.0
    if rate <= 0.0 or rate >= 1.0 or factor == 1.0:
        return rate
    scaled = rate / (1.0 - rate) * factor
    return scaled / (1.0 + scaled)


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
        provider: str | None = None,
        logprobs: bool | None = None,
        kind_odds: Mapping[str, float] = KIND_ODDS,
    ) -> None:
        self.tier = tier
        self.model = model
        # None: as the default ladder's two tiers (slm: vLLM with logprobs; else Claude)
        self.provider = provider or ("sim-vllm" if tier == "slm" else "sim-anthropic")
        self.logprobs = tier == "slm" if logprobs is None else logprobs
        self.mean_latency_s = mean_latency_s
        self.invalid_rate = invalid_rate
        self.kind_odds = kind_odds
        self.seed = seed

    def invalid_chance(self, job: JobSpec) -> float:
        return invalid_chance(self.invalid_rate, job.metadata.get("kind"), self.kind_odds)

    def _rng(self, job: JobSpec) -> random.Random:
        content = json.dumps(job.payload(), sort_keys=True)
        digest = hashlib.sha256(f"{self.seed}:{self.tier}:{content}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def complete(self, job: JobSpec, *, timeout_s: float) -> Completion:
        rng = self._rng(job)
        latency_s = self.mean_latency_s * rng.uniform(0.5, 1.5)
        invalid = rng.random() < self.invalid_chance(job)
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
        logprob = -rng.uniform(0.05, 0.6) if self.logprobs else None
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
