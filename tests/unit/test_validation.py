from __future__ import annotations

import json
import random
from collections import Counter

import jsonschema
import pytest

from tierfleet.envelope import named_output_schema, parse_envelope
from tierfleet.errors import InvalidOutput, ProviderTimeout
from tierfleet.prices import Usage
from tierfleet.resources import schemas_dir
from workers.backends.base import Completion
from workers.backends.sim import SimulatedBackend, example_instance
from workers.validation import validate

SENTIMENT = named_output_schema("sentiment")


def answer(text: str, finish_reason: str = "stop", logprob: float | None = None) -> Completion:
    return Completion(
        text=text, usage=Usage(10, 5), finish_reason=finish_reason, mean_logprob=logprob
    )


def test_a_schema_valid_answer_is_returned_parsed() -> None:
    assert validate(answer('{"label": "positive"}'), SENTIMENT)["label"] == "positive"
    assert validate(answer('```json\n{"label": "neutral"}\n```'), SENTIMENT) == {"label": "neutral"}


def test_free_text_is_returned_as_is() -> None:
    assert validate(answer("A short summary."), None) == "A short summary."


@pytest.mark.parametrize(
    ("completion", "rule"),
    [
        (answer('{"label": "positive"'), "json"),
        (answer('Sure! {"label": "positive"}'), "json"),
        (answer('{"label": "ecstatic"}'), "schema"),
        (answer("{}"), "schema"),
        (answer('{"label": "positive"}', finish_reason="length"), "length"),
        (answer("   "), "empty"),
    ],
)
def test_invalid_answers_name_the_rule(completion: Completion, rule: str) -> None:
    with pytest.raises(InvalidOutput) as info:
        validate(completion, SENTIMENT)
    assert info.value.rule == rule


def test_low_token_logprobs_fail_only_when_a_threshold_is_set() -> None:
    confident = answer('{"label": "positive"}', logprob=-0.9)
    assert validate(confident, SENTIMENT)
    with pytest.raises(InvalidOutput) as info:
        validate(confident, SENTIMENT, min_mean_logprob=-0.5)
    assert info.value.rule == "logprob"


@pytest.mark.parametrize(
    "path", sorted((schemas_dir() / "outputs").glob("*.json")), ids=lambda p: p.stem
)
def test_simulated_answers_satisfy_every_shipped_schema(path: object) -> None:
    schema = json.loads(path.read_text())  # type: ignore[attr-defined]
    for seed in range(25):
        jsonschema.validate(example_instance(schema, random.Random(seed)), schema)


def test_the_simulated_small_model_is_deterministic_and_invalid_at_its_rate() -> None:
    backend = SimulatedBackend(tier="slm", model="m", mean_latency_s=0.0, invalid_rate=0.3)
    jobs = [
        parse_envelope({"feature": "f", "prompt": f"review {i}", "output_schema": "sentiment"})
        for i in range(400)
    ]
    outcomes: Counter[bool] = Counter()
    for job in jobs:
        first = backend.complete(job, timeout_s=1)
        assert backend.complete(job, timeout_s=1) == first
        try:
            validate(first, job.output_schema)
            outcomes[True] += 1
        except InvalidOutput:
            outcomes[False] += 1
    assert 0.22 < outcomes[False] / len(jobs) < 0.38


def test_a_simulated_call_slower_than_its_timeout_times_out() -> None:
    backend = SimulatedBackend(tier="slm", model="m", mean_latency_s=0.2, invalid_rate=0.0)
    job = parse_envelope({"feature": "f", "prompt": "x"})
    with pytest.raises(ProviderTimeout):
        backend.complete(job, timeout_s=0.01)


def test_validation_over_its_deadline_is_an_invalid_answer() -> None:
    schema = {"items": {"anyOf": [{"required": [f"k{i}"]} for i in range(200)]}}
    with pytest.raises(InvalidOutput) as info:
        validate(answer(json.dumps([{}] * 5_000)), schema, deadline_s=0.05)
    assert info.value.rule == "validation_timeout"
    assert "0.05" in str(info.value)


def test_a_ref_that_resolves_to_nothing_is_an_invalid_answer_naming_it() -> None:
    with pytest.raises(InvalidOutput) as info:
        validate(answer("{}"), {"$ref": "urn:example:nowhere"})
    assert info.value.rule == "schema_ref"
    assert "urn:example:nowhere" in str(info.value)


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("[" * 100_000 + "]" * 100_000, "json"),  # too deep for the JSON parser
        ("1" * 5_000, "json"),  # over Python's digits limit for an integer
    ],
    ids=["deep", "digits"],
)
def test_an_answer_json_cannot_hold_is_invalid_json(text: str, rule: str) -> None:
    with pytest.raises(InvalidOutput) as info:
        validate(answer(text), {"type": "array"})
    assert info.value.rule == rule


def test_a_schema_that_refers_to_itself_without_end_is_an_invalid_answer() -> None:
    with pytest.raises(InvalidOutput) as info:
        validate(answer("{}"), {"$ref": "#"})
    assert info.value.rule == "validation_depth"


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        ("^\\u0041+$", "AAA", True),  # an ECMA-262 escape
        ("\\\\u0041", "\\u0041", True),  # an escaped backslash, then "u0041"
        ("^\\d+$", "\u0661\u0662", False),  # ECMA-262 \\d is ASCII
        ("^a$", "a\n", False),  # ECMA-262 $ ends the input only
        ("b", "abc", True),  # unanchored: a search
        ("^x", "x\ud800", True),  # a lone surrogate in the answer
    ],
)
def test_patterns_match_as_json_schema_says(pattern: str, value: str, matches: bool) -> None:
    schema = {"properties": {"a": {"pattern": pattern}}}
    text = json.dumps({"a": value})
    if matches:
        assert validate(answer(text), schema) == {"a": value}
    else:
        with pytest.raises(InvalidOutput):
            validate(answer(text), schema)
