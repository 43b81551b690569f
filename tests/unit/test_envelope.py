from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from tierfleet.envelope import JobSpec, parse_envelope
from tierfleet.errors import InvalidEnvelope
from tierfleet.resources import examples_dir


def base(**fields: Any) -> dict[str, Any]:
    return {"feature": "support-triage", "prompt": "Classify: the app crashes", **fields}


def test_minimal_envelope_gets_defaults_and_an_id() -> None:
    spec = parse_envelope(base())
    assert spec.id
    assert spec.messages == ({"role": "user", "content": "Classify: the app crashes"},)
    assert (spec.route, spec.latency, spec.max_tokens, spec.temperature) == (
        "auto",
        "interactive",
        512,
        0.0,
    )


def test_given_id_and_named_schema_are_kept_and_resolved() -> None:
    spec = parse_envelope(base(id="job-1", output_schema="sentiment"))
    assert spec.id == "job-1"
    assert spec.output_schema_name == "sentiment"
    assert spec.output_schema is not None and spec.output_schema["type"] == "object"


@pytest.mark.parametrize(
    ("envelope", "field", "words"),
    [
        ({"prompt": "x"}, "feature", "required"),
        ({"feature": "f"}, "prompt", "one of 'messages' or 'prompt'"),
        (base(messages=[{"role": "user", "content": "x"}]), "messages", "not both"),
        (base(route="gpu"), "route", "unknown tier 'gpu'"),
        (base(output_schema={"type": "nope"}), "output_schema", "not a valid JSON Schema"),
        (base(output_schema="no_such_schema"), "output_schema", "unknown output schema"),
        (base(max_tokens=0), "max_tokens", "minimum"),
        (base(max_tokens="many"), "max_tokens", "not of type 'integer'"),
        (base(latency="soon"), "latency", "is not one of"),
        (base(colour="red"), "colour", "unknown field 'colour'"),
        (
            {"feature": "f", "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            "is not one of",
        ),
        (
            {
                "feature": "f",
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ],
            },
            "messages[1].role",
            "last message must be the user's",
        ),
    ],
)
def test_invalid_envelopes_name_the_field(envelope: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(InvalidEnvelope) as info:
        parse_envelope(envelope)
    assert info.value.field == field
    assert words in str(info.value)
    assert repr(field) in str(info.value)


@pytest.mark.parametrize("value", [None, [], "text", 3])
def test_non_object_envelopes_are_rejected(value: Any) -> None:
    with pytest.raises(InvalidEnvelope, match="JSON object"):
        parse_envelope(value)


def test_every_shipped_example_is_valid() -> None:
    lines = (examples_dir() / "jobs.jsonl").read_text(encoding="utf-8").splitlines()
    kinds = {parse_envelope(json.loads(line)).metadata["kind"] for line in lines}
    assert len(lines) >= 200
    assert kinds == {"classification", "extraction", "summary", "reasoning", "code"}


def test_payload_round_trips_through_the_ledger_form() -> None:
    spec = parse_envelope(
        base(system="be brief", output_schema="sentiment", metadata={"k": 1}, idempotency_key="k1")
    )
    again = JobSpec.from_row(
        id=spec.id,
        feature=spec.feature,
        route=spec.route,
        latency=spec.latency,
        payload=json.loads(json.dumps(spec.payload())),
    )
    # the idempotency key lives in its own column, not in the payload
    assert again == dataclasses.replace(spec, idempotency_key=None)
