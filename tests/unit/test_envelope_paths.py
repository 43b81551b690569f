"""The fast paths never accept an envelope that the JSON Schema rejects, and when they
accept one they build the same job as the reference path."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierfleet import constants as C
from tierfleet import envelope_fast
from tierfleet.envelope import _fast_validator, parse_envelope
from tierfleet.errors import InvalidEnvelope
from tierfleet.resources import schemas_dir

SCHEMA = json.loads((schemas_dir() / "job.schema.json").read_text())
REFERENCE = jsonschema.validators.validator_for(SCHEMA)(SCHEMA)

texts = st.text(max_size=12)
odd_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40000), st.floats(allow_nan=False), texts,
    st.lists(texts, max_size=2), st.dictionaries(texts, texts, max_size=2),
)  # fmt: skip
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", ""]), "content": texts},
    optional={"name": texts},
)
fields: dict[str, st.SearchStrategy[Any]] = {
    "feature": st.one_of(st.sampled_from(["reviews", "a/b-c.d", "bad feature", "", "x\n"]),
                         odd_values),
    "id": st.one_of(st.sampled_from(["job-1", "a:b.c", "-bad", "x" * 70]), odd_values),
    "idempotency_key": st.one_of(texts, odd_values),
    "messages": st.one_of(st.lists(message, max_size=3), odd_values),
    "prompt": st.one_of(texts, odd_values),
    "system": st.one_of(texts, odd_values),
    "output_schema": st.one_of(
        st.sampled_from(["sentiment", "summary", "Nope", "no_such"]),
        st.just({"type": "object"}), st.just({"type": 12}), odd_values,
    ),
    "max_tokens": st.one_of(st.integers(-1, 40000), st.just(2.0), odd_values),
    "temperature": st.one_of(st.floats(-1, 3, allow_nan=False), odd_values),
    "route": st.one_of(st.sampled_from(["auto", "slm", "frontier", "gpu", "SLM"]), odd_values),
    "latency": st.one_of(st.sampled_from(["batch", "interactive", "soon"]), odd_values),
    "metadata": st.one_of(st.dictionaries(texts, texts, max_size=2), odd_values),
    "schema_version": st.one_of(st.just(1), odd_values),
    "colour": odd_values,
}  # fmt: skip
good: dict[str, st.SearchStrategy[Any]] = {
    "id": st.sampled_from(["job-1", "a:b.c"]),
    "idempotency_key": st.text(min_size=1, max_size=8),
    "system": texts,
    "output_schema": st.sampled_from(["sentiment", "summary", {"type": "object"}]),
    "max_tokens": st.integers(1, 32768),
    "temperature": st.floats(0, 2, allow_nan=False),
    "route": st.sampled_from(["auto", "slm", "frontier"]),
    "latency": st.sampled_from(["batch", "interactive"]),
    "metadata": st.dictionaries(texts, texts, max_size=2),
}
valid_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                           "content": st.text(min_size=1, max_size=8)}),
    min_size=1, max_size=3,
).map(lambda ms: [*ms[:-1], {**ms[-1], "role": "user"}])  # fmt: skip
bases = st.one_of(
    st.fixed_dictionaries({"feature": st.just("reviews"), "prompt": st.text(min_size=1)},
                          optional=good),
    st.fixed_dictionaries({"feature": st.just("a/b-c.d"), "messages": valid_messages},
                          optional=good),
)  # fmt: skip


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly valid envelopes, each with a few fields possibly broken or dropped."""
    data = dict(draw(bases))
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=2, unique=True)):
        if draw(st.booleans()):
            data[name] = draw(fields[name])
        else:
            data.pop(name, None)
    return data


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(envelopes())
def test_the_compiled_validator_accepts_nothing_the_schema_rejects(data: dict[str, Any]) -> None:
    fast_ok = ("messages" in data) != ("prompt" in data)
    if fast_ok:
        try:
            _fast_validator()(data)
        except Exception:
            fast_ok = False
    if fast_ok:
        assert REFERENCE.is_valid(data), data


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(envelopes())
def test_the_typed_decoder_agrees_with_the_reference(data: dict[str, Any]) -> None:
    line = orjson.dumps(data)
    try:
        fast = envelope_fast.decode(line, {}, "gen-id", "gen-key", C.TIER_LADDER)
    except envelope_fast.NotFast:
        return  # the reference path decides
    assert REFERENCE.is_valid(data), data
    reference = parse_envelope({"id": "gen-id", "idempotency_key": "gen-key", **data})
    assert fast == reference


def test_a_rejected_line_still_gets_the_reference_message() -> None:
    line = b'{"feature": "f", "prompt": "x", "max_tokens": 0}'
    try:
        envelope_fast.decode(line, {}, "i", "k", C.TIER_LADDER)
    except envelope_fast.NotFast:
        pass
    else:
        raise AssertionError("max_tokens 0 must not pass the fast path")
    try:
        parse_envelope(orjson.loads(line))
    except InvalidEnvelope as exc:
        assert exc.field == "max_tokens"
