"""Fuzzing what producers hand in: job envelopes, JSONL lines, and the JSONL files.

- `parse_envelope` on any JSON value returns a `JobSpec` or raises `InvalidEnvelope`,
  nothing else; it accepts only what `schemas/job.schema.json` accepts (under the draft the
  schema declares), rejects all the schema rejects, and what it accepts the ledger can
  store and read back unchanged.
- `envelope_fast.decode` declines (`NotFast`) or builds exactly the job `parse_envelope`
  builds from the same document; `parse_line` on any bytes raises nothing but
  `InvalidEnvelope`, and decides every line as the reference does.
- Adversarial output schemas (patterns that backtrack, references out of the schema in many
  spellings and hiding places, very wide and very deep schemas) are accepted or refused
  with `InvalidEnvelope` at once; any answer (long runs of one character, deep or wide
  JSON) validates against an accepted one or raises `InvalidOutput`, quickly; and neither
  step opens a connection or a URL, whether the schema was accepted or not.
- `read_lines` reads any bytes, plain or gzip, as `bytes.split(b"\\n")` would (numbering,
  sizes, final newline or not); a damaged gzip fails only with the errors `submit` handles.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import socket
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import jsonschema
import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from producers.bulk import BatchOptions, parse_line
from producers.jsonl import Input, RawLine, read_lines
from tierfleet import constants as C
from tierfleet import envelope_fast, schema_guard
from tierfleet.envelope import MAX_ENVELOPE_BYTES, JobSpec, named_output_schema, parse_envelope
from tierfleet.errors import InvalidEnvelope, InvalidOutput
from tierfleet.prices import Usage
from tierfleet.resources import schemas_dir
from workers.backends.base import Completion
from workers.validation import validate

pytestmark = [
    pytest.mark.chaos,
    # `re` warns of a regex whose meaning a later Python may change ("[[a]"); a pattern
    # drawn at random for an output schema can be one. A warning, not a failure.
    pytest.mark.filterwarnings("ignore:Possible .*set:FutureWarning"),
    # Hypothesis warns when it prints an example of a megabyte; the example is still right.
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
]

CHAOS = settings.get_profile("chaos")
SCHEMA = json.loads((schemas_dir() / "job.schema.json").read_text(encoding="utf-8"))
DRAFT = jsonschema.validators.validator_for(SCHEMA, default=None)
assert DRAFT is not None, "the envelope schema declares a draft jsonschema knows"
REFERENCE = DRAFT(SCHEMA)
PROPS: dict[str, Any] = SCHEMA["properties"]
NAMED = sorted(p.stem for p in (schemas_dir() / "outputs").glob("*.json"))
BATCH, LINE_NO = "b-fuzz", 7
JOB_ID, KEY = f"{BATCH}.{LINE_NO}", f"{BATCH}:{LINE_NO}"  # what parse_line generates
READ_ERRORS = (OSError, EOFError, zlib.error)  # what `submit` reports as an unreadable input
UNREADABLE = object()  # a line that is not JSON

# ---------------------------------------------------------------------------------------
# Strategies

texts = st.text(max_size=16)
big_ints = st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30])
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), big_ints,
    st.floats(allow_nan=False, allow_infinity=False), texts,
)  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


deep_values = st.integers(1, 400).map(nested)

WEIRD = ' \t\n\r\x00\x1b\x1f\x7f\x85\u2028\ufeffé😀"\\/.:_-'
identifier_chars = st.sampled_from([*"aZ09", *WEIRD, "\ud800"])


def identifiers(pattern: str) -> st.SearchStrategy[str]:
    """Strings that match `pattern`, the same with a control character or a lone
    surrogate at the end, and strings from an alphabet of troublemakers."""
    valid = st.from_regex(pattern, fullmatch=True)
    return st.one_of(
        valid,
        st.tuples(valid, st.sampled_from(["\n", "\r\n", "\x00", "\x7f", "\ud800", " "])).map(
            "".join
        ),
        st.text(identifier_chars, max_size=70),
        st.sampled_from(["", "a" * 32, "a" * 33, "a" * 64, "a" * 65, "a" * 100, "a" * 101]),
    )


huge_texts = st.tuples(
    st.sampled_from(["x", "é", "😀", "\x00", "\ud800"]),
    st.sampled_from([1, 199, 200, 201, 5_000, 100_000]),
).map(lambda t: t[0] * t[1])
free_texts = st.one_of(texts, st.text(identifier_chars, max_size=20), huge_texts)
numbers = st.one_of(
    st.integers(-2, 3), st.integers(32766, 32769), st.integers(), big_ints, st.floats(),
    st.sampled_from([0.5, 1.5, 2.0, 2.5, -0.0, 1e308, 32768.0, math.nan, math.inf, -math.inf]),
)  # fmt: skip

SCHEMA_URIS = [
    "https://json-schema.org/draft/2020-12/schema", "http://json-schema.org/draft-07/schema#",
    "http://json-schema.org/draft-04/schema#", "http://json-schema.org/draft-03/schema#",
    "urn:example:no-such-draft", "http://[", "", 5, None, [], {},
]  # fmt: skip
patterns = st.one_of(
    st.sampled_from(["^[a-z]+$", "a{1,3}", "(", "[", "a{9999999999}", "(?P<x>a)(?P=x)", "\\p{L}"]),
    st.sampled_from([500, 5_000]).map(lambda n: "(" * n + ")" * n),  # nested groups
    st.just(10_000).map(lambda n: "x" * n),
    texts,
)  # fmt: skip
keywords: dict[str, st.SearchStrategy[Any]] = {
    "$schema": st.sampled_from(SCHEMA_URIS),
    "type": st.sampled_from(["object", "string", "integer", "array", "null", "nope"]) | json_values,
    "pattern": patterns,
    "patternProperties": st.dictionaries(patterns, st.just({}), max_size=2),
    "minimum": numbers | json_values,
    "required": st.lists(texts, max_size=3) | json_values,
    "enum": st.lists(json_values, max_size=3) | json_values,
    "$ref": st.sampled_from(["#", "#/$defs/x", "http://example.com/s.json", "\x00"]) | json_values,
    "format": st.sampled_from(["email", "date-time", "regex", "nope"]) | json_values,
    "additionalProperties": st.booleans() | json_values,
}
schema_objects = st.recursive(
    st.fixed_dictionaries({}, optional=keywords),
    lambda inner: st.fixed_dictionaries(
        {},
        optional={
            **keywords,
            "properties": st.dictionaries(texts, inner, max_size=3),
            "items": inner,
            "anyOf": st.lists(inner, min_size=1, max_size=3),
            "metadata": deep_values,
        },
    ),
    max_leaves=4,
)
output_schemas = st.one_of(
    st.sampled_from(NAMED),
    st.sampled_from(["Nope", "no_such", "sentiment\n", "../sentiment", "sentiment.json"]),
    identifiers(next(b["pattern"] for b in PROPS["output_schema"]["oneOf"] if "pattern" in b)),
    st.just({"type": "object"}),
    schema_objects,
)

message_dicts = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "assistant", "system", ""]) | json_values,
        "content": free_texts | json_values,
        "name": texts,
    },
)
valid_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant"]), "content": st.text(min_size=1)}
    ),
    min_size=1,
    max_size=4,
).map(lambda ms: [*ms[:-1], {**ms[-1], "role": "user"}])
messages_values = st.one_of(
    valid_messages,
    st.lists(message_dicts, max_size=4),
    st.sampled_from([0, 499, 500, 501]).map(lambda n: [{"role": "user", "content": "x"}] * n),
    json_values,
)

mutations: dict[str, st.SearchStrategy[Any]] = {
    "feature": identifiers(PROPS["feature"]["pattern"]) | json_values,
    "id": identifiers(PROPS["id"]["pattern"]) | json_values,
    "idempotency_key": identifiers(PROPS["id"]["pattern"]) | free_texts | json_values,
    "route": st.sampled_from(["auto", *C.TIER_LADDER, "gpu", "SLM", "slm\n"])
    | identifiers(PROPS["route"]["pattern"])
    | json_values,
    "latency": st.sampled_from(["batch", "interactive", "soon", "batch\n"]) | json_values,
    "messages": messages_values,
    "prompt": free_texts | json_values,
    "system": free_texts | json_values,
    "output_schema": output_schemas | json_values,
    "max_tokens": numbers | json_values,
    "temperature": st.sampled_from([math.nan, math.inf, -math.inf, 2.5, -0.5])
    | numbers
    | json_values,
    "schema_version": st.sampled_from([1, 1.0, True, 2, "1"]) | json_values,
    "metadata": st.dictionaries(texts, json_values | deep_values, max_size=3) | json_values,
}
UNKNOWN = "<an unknown key>"

no_control = st.characters(
    exclude_categories=["Cs"], exclude_characters="".join(map(chr, range(32))) + "\x7f"
)
good_fields: dict[str, st.SearchStrategy[Any]] = {
    "id": st.from_regex(PROPS["id"]["pattern"], fullmatch=True),
    "idempotency_key": st.text(no_control, min_size=1, max_size=20),
    "system": texts,
    "output_schema": st.sampled_from([*NAMED, {"type": "object"}]),
    "max_tokens": st.integers(1, 32768),
    "temperature": st.floats(0, 2),
    "route": st.sampled_from(["auto", *C.TIER_LADDER]),
    "latency": st.sampled_from(["batch", "interactive"]),
    "metadata": st.dictionaries(texts, json_values, max_size=3),
    "schema_version": st.just(1),
}
valid_envelopes = st.tuples(
    st.fixed_dictionaries(
        {"feature": st.from_regex(PROPS["feature"]["pattern"], fullmatch=True)},
        optional=good_fields,
    ),
    st.fixed_dictionaries({"prompt": st.text(min_size=1)})
    | st.fixed_dictionaries({"messages": valid_messages}),
).map(lambda t: {**t[0], **t[1]})


@st.composite
def envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid envelope with up to three fields replaced, dropped or added."""
    data = draw(valid_envelopes)
    for name in draw(st.lists(st.sampled_from([*mutations, UNKNOWN]), max_size=3, unique=True)):
        if name == UNKNOWN:
            data[draw(texts.filter(lambda k: k not in PROPS))] = draw(json_values)
        elif draw(st.booleans()):
            data[name] = draw(mutations[name])
        else:
            data.pop(name, None)
    return data


documents = st.one_of(
    envelopes(),
    json_values,
    st.dictionaries(st.sampled_from(sorted(PROPS)) | texts, json_values, max_size=6),
)
defaults = st.builds(
    BatchOptions,
    feature=st.sampled_from([None, "reviews", "team/a-b"]),
    route=st.sampled_from([None, "auto", *C.TIER_LADDER]),
    latency=st.sampled_from(["batch", "interactive"]),
).map(BatchOptions.defaults)


def as_line(doc: Any, ensure_ascii: bool) -> bytes:
    # `surrogatepass`: a lone surrogate becomes the (invalid UTF-8) bytes that encode it
    return json.dumps(doc, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


FRAGMENTS = [
    b"{", b"}", b"[", b"]", b'"', b":", b",", b" ", b"\\", b"\\u0000", b"\\ud800", b"\\udc00",
    b"\xed\xa0\x80", b"\xed\xb0\x80", b"\xff", b"\xc3", b"\x00", b"\r", b"\t", b"\xef\xbb\xbf",
    b"1e400", b"-0", b"2.0", b"NaN", b"18446744073709551616", b"true", b"null", b'"feature"',
    b'"prompt"', b'"messages"', b'"metadata"', b'"reviews"', b'"x"', b'"role"', b'"user"',
]  # fmt: skip


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """The line of a (mostly valid) envelope with a few bytes inserted, deleted or replaced."""
    line = bytearray(as_line(draw(envelopes()), draw(st.booleans())))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(line)))
        junk = draw(st.sampled_from(FRAGMENTS) | st.binary(min_size=1, max_size=3))
        match draw(st.sampled_from(["insert", "delete", "replace"])):
            case "insert":
                line[at:at] = junk
            case "delete":
                del line[at : at + len(junk)]
            case _:
                line[at : at + len(junk)] = junk
    return bytes(line)


def with_keys(pairs: list[tuple[str, Any]]) -> bytes:
    """An object written key by key: keys may repeat, which `json.dumps` never writes."""
    return ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}").encode()


deep_lines = st.tuples(st.sampled_from([b"[", b'{"a":']), st.integers(1, 3000)).map(
    lambda t: (
        b'{"feature":"f","prompt":"x","metadata":{"m":'
        + t[0] * t[1]
        + (b"]" if t[0] == b"[" else b"}") * t[1]
        + b"}}"
    )
)
byte_lines = st.one_of(
    st.binary(max_size=80),
    st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=3), max_size=30).map(b"".join),
    damaged(),
    st.lists(st.tuples(st.sampled_from([*PROPS, "colour"]), json_values), max_size=6).map(
        with_keys
    ),
    st.lists(
        st.tuples(st.sampled_from(["feature", "prompt", "messages"]), mutations["prompt"]),
        max_size=5,
    ).map(with_keys),
    deep_lines,
)

# ---------------------------------------------------------------------------------------
# What a job built from a document must be


def reference(doc: Any) -> JobSpec | InvalidEnvelope:
    """The reference outcome; any exception but `InvalidEnvelope` fails the test."""
    try:
        return parse_envelope(doc)
    except InvalidEnvelope as exc:
        assert exc.reason, "an InvalidEnvelope says what is wrong"
        return exc


def merged(doc: Any, defaults: Mapping[str, Any]) -> Any:
    """The document `parse_line` validates: batch defaults under it, generated ids."""
    if not isinstance(doc, dict):
        return doc
    return {"id": JOB_ID, "idempotency_key": KEY, **defaults, **doc}


def assert_faithful(spec: JobSpec, doc: Mapping[str, Any]) -> None:
    """`spec` is the job `doc` describes, within the schema's bounds, and the ledger's
    form of it (orjson text, as `jobs.payload`) reads back as the same job."""
    assert spec.feature == doc["feature"]
    if "id" in doc:
        assert spec.id == doc["id"]
    else:
        assert len(spec.id) == 36  # a generated UUID
    assert spec.idempotency_key == doc.get("idempotency_key")
    assert type(spec.max_tokens) is int
    assert spec.max_tokens == doc.get("max_tokens", 512)
    assert 1 <= spec.max_tokens <= 32768
    assert type(spec.temperature) is float
    assert spec.temperature == doc.get("temperature", 0)
    assert 0 <= spec.temperature <= 2
    assert spec.route == doc.get("route", "auto")
    assert spec.route in (C.ROUTE_AUTO, *C.TIER_LADDER)
    assert spec.latency == doc.get("latency", "interactive")
    if "prompt" in doc:
        assert spec.messages == ({"role": "user", "content": doc["prompt"]},)
    else:
        assert spec.messages == tuple(doc["messages"])
    assert spec.messages[-1]["role"] == "user"
    assert spec.system == doc.get("system")
    given_schema = doc.get("output_schema")
    if isinstance(given_schema, str):
        assert spec.output_schema_name == given_schema
        assert spec.output_schema == named_output_schema(given_schema)
    else:
        assert spec.output_schema_name is None
        assert spec.output_schema == given_schema
    assert spec.metadata == (doc.get("metadata") or {})
    stored = orjson.loads(orjson.dumps(spec.payload()))
    again = JobSpec.from_row(
        id=spec.id, feature=spec.feature, route=spec.route, latency=spec.latency, payload=stored
    )
    assert again == dataclasses.replace(spec, idempotency_key=None)


def check_envelope(doc: Any) -> None:
    schema_ok = REFERENCE.is_valid(doc)
    outcome = reference(doc)
    if isinstance(outcome, InvalidEnvelope):
        if isinstance(doc, dict) and outcome.field:  # one the document has, or must have
            assert any(
                outcome.field == key or outcome.field.startswith((f"{key}.", f"{key}["))
                for key in {*doc, *PROPS}
            ), outcome.field
        return
    assert schema_ok, f"parse_envelope accepted what the schema rejects: {doc!r:.300}"
    assert_faithful(outcome, doc)


def check_line(line: bytes, defaults: Mapping[str, Any], last: bool, newline: bool) -> None:
    """`decode` declines or agrees with `parse_envelope`; `parse_line` decides the line
    as the reference does: the document orjson reads, with the batch's defaults."""
    try:
        fast: JobSpec | None = envelope_fast.decode(line, defaults, JOB_ID, KEY, C.TIER_LADDER)
    except envelope_fast.NotFast:
        fast = None
    try:
        doc: Any = orjson.loads(line)
    except orjson.JSONDecodeError:
        assert fast is None, f"the fast path took a line orjson cannot read: {line!r:.300}"
        doc = UNREADABLE
    if fast is not None:
        document = merged(json.loads(line), defaults)
        assert REFERENCE.is_valid(document), f"decode accepted what the schema rejects: {line!r}"
        assert fast == reference(document)
        assert_faithful(fast, document)

    raw = RawLine(LINE_NO, line, len(line), last, newline)
    try:
        got: JobSpec | InvalidEnvelope = parse_line(raw, defaults, BATCH, MAX_ENVELOPE_BYTES)
    except InvalidEnvelope as exc:
        got = exc
    if fast is not None:
        assert got == fast
        return
    if doc is UNREADABLE:
        assert isinstance(got, InvalidEnvelope)
        assert got.reason.startswith(("not UTF-8", "not JSON", "the last line is cut short"))
        return
    expected = reference(merged(doc, defaults))
    if isinstance(expected, InvalidEnvelope):
        assert isinstance(got, InvalidEnvelope), got
        assert (got.field, got.reason) == (expected.field, expected.reason)
    else:
        assert got == expected
        assert REFERENCE.is_valid(merged(doc, defaults))
        assert_faithful(expected, merged(doc, defaults))


# ---------------------------------------------------------------------------------------
# The envelope


def test_the_reference_is_the_draft_the_schema_declares() -> None:
    assert DRAFT is not None
    assert DRAFT.META_SCHEMA["$id"].rstrip("#") == SCHEMA["$schema"].rstrip("#")
    assert not REFERENCE.is_valid({"feature": "f", "prompt": "x", "messages": []})


@settings(CHAOS, max_examples=500)
@given(documents)
@example({"feature": "f", "prompt": "\ud800"})  # orjson cannot store a lone surrogate
@example({"feature": "f", "prompt": "x", "metadata": {"n": 2**64}})  # nor a 65-bit integer
@example({"feature": "f", "prompt": "x", "metadata": {"m": nested(254)}})  # nor 255 levels
@example({"feature": "f", "prompt": "x", "temperature": math.nan})  # NaN is within [0, 2]
@example({"feature": "f", "prompt": "x", "max_tokens": 2.0})  # an integer to the schema
def test_parse_envelope_accepts_exactly_what_the_schema_accepts(doc: Any) -> None:
    check_envelope(doc)


@settings(CHAOS, max_examples=300)
@given(json_values)
def test_parse_envelope_never_crashes_on_any_json_value(doc: Any) -> None:
    check_envelope(doc)
    check_envelope({"feature": "f", "prompt": "x", "metadata": {"v": doc}})


@settings(CHAOS, max_examples=300)
@given(output_schemas | json_values, defaults)
@example({"pattern": "a{9999999999}"}, {})  # OverflowError compiling it
@example({"pattern": "(" * 5000 + ")" * 5000}, {})  # RecursionError compiling it
@example({"$schema": 5}, {})  # AttributeError looking the draft up
@example({"$schema": []}, {})  # TypeError
@example({"$schema": "http://["}, {})  # ValueError
@example({"$schema": "urn:example:no-such-draft"}, {})  # DeprecationWarning
@example({"minimum": -(2**63) - 1}, {})  # cannot be stored
def test_an_output_schema_is_checked_or_refused_on_both_paths(
    schema: Any, defaults: dict[str, Any]
) -> None:
    doc = {"feature": "f", "prompt": "x", "output_schema": schema}
    check_envelope(doc)
    check_line(as_line(doc, ensure_ascii=True), defaults, last=True, newline=True)
    outcome = reference(doc)
    if isinstance(outcome, JobSpec) and isinstance(schema, dict):
        # what a worker does with it: the draft the schema names, no warning, no error
        draft = schema_guard.draft_of(schema)
        schema_guard.check_meta(schema, draft)
        schema_guard.safe_validator(schema)


# ---------------------------------------------------------------------------------------
# Adversarial output schemas, and the answers validated against them

EVIL_PATTERNS = [
    "(x+x+)+y", "(a|a)*b", "^(a*)*$", "^(\\w+\\s?)*$", "((x*)*)*y", "(.*a){12}", "(x+)+\\1",
    "(?=x)x", "(?<!a)b", "x{1000}", "x{1001}", "\\u0078+y", "[", "x" * 1001,
]  # fmt: skip
LOOPBACK = "127.0.0.1:9"  # nothing is to be asked for it: every attempt is recorded
REF_SPELLINGS = [
    f"http://{LOOPBACK}/s.json", f"https://{LOOPBACK}/s.json#/x", f"HTTP://{LOOPBACK}/s",
    f"//{LOOPBACK}/x", "file:///etc/passwd", "file:/etc/hostname", "other.json",
    "../other.json#/a", "urn:example:unknown", "urn:tierfleet:output:nope",
    "urn:tierfleet:output:sentiment", "#", "#/$defs/a", "#/nowhere", "#anchor",
    "jar:file:///x!/y", "\\\\host\\share",
]  # fmt: skip
evil_patterns = st.sampled_from(EVIL_PATTERNS)
ref_spellings = st.sampled_from(REF_SPELLINGS)
attack_keywords: dict[str, st.SearchStrategy[Any]] = {
    "pattern": evil_patterns,
    "patternProperties": st.dictionaries(evil_patterns, st.just({}) | st.booleans(), max_size=2),
    "additionalProperties": st.booleans(),
    "propertyNames": st.fixed_dictionaries({"pattern": evil_patterns}),
    "uniqueItems": st.just(True),
    "$ref": ref_spellings,
    "$dynamicRef": ref_spellings,
    "$id": st.sampled_from([f"http://{LOOPBACK}/s.json", "urn:x:y", "a.json"]),
    "unevaluatedProperties": st.booleans(),
}
attack_objects = st.recursive(
    st.fixed_dictionaries({}, optional=attack_keywords),
    lambda inner: st.fixed_dictionaries(
        {},
        optional={
            **attack_keywords,
            "properties": st.dictionaries(st.sampled_from(["a", "x" * 40]), inner, max_size=2),
            "items": inner,
            "$defs": st.fixed_dictionaries({"a": inner}),
            "allOf": st.lists(inner, min_size=1, max_size=3),
            "anyOf": st.lists(inner, min_size=1, max_size=3),
            "x-data": inner,  # a keyword no draft defines, which a "#/x-data" can reach
        },
    ),
    max_leaves=6,
)


def deep_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"pattern": "(x+x+)+y"}
    for _ in range(depth):
        schema = {"items": schema}
    return schema


attack_schemas = st.one_of(
    attack_objects,
    st.sampled_from([500, 999, 1_001, 150_000]).map(lambda n: {"allOf": [{}] * n}),
    st.sampled_from([10, 31, 32, 33, 100, 250]).map(deep_schema),
    st.sampled_from([1_000, 20_000]).map(lambda n: {"enum": ["x"] * n}),
)
runs = st.tuples(st.sampled_from(["x", "a", " ", "é"]), st.sampled_from([1, 30, 5_000, 100_000]))
long_strings = runs.map(lambda t: t[0] * t[1]) | runs.map(lambda t: t[0] * t[1] + "!")
attack_answers = st.one_of(  # the text of an answer
    st.one_of(
        json_values,
        long_strings,
        long_strings.map(lambda s: {"a": s, s[:64]: s}),
        st.just([{"n": i} for i in range(5_000)]),
        st.just({f"x{i}": "x" * 30 for i in range(5_000)}),
    ).map(json.dumps),
    st.sampled_from([100, 900, 5_000, 100_000]).map(lambda n: "[" * n + "]" * n),
)
SUBMIT_BOUND_S = 5.0  # a refusal or an acceptance (under 0.3 s on an idle machine)
VALIDATE_BOUND_S = 10.0  # VALIDATION_DEADLINE_S, and parsing an answer of 100 KB


@contextmanager
def no_network_or_url() -> Iterator[list[Any]]:
    """Record, and refuse, every connection and every URL opened in the block."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args[1:] or args)
        raise OSError("no connection in this test")

    with (
        mock.patch.object(socket.socket, "connect", refuse),
        mock.patch.object(socket.socket, "connect_ex", refuse),
        mock.patch.object(socket, "create_connection", refuse),
        mock.patch.object(urllib.request.OpenerDirector, "open", refuse),
    ):
        yield attempts


def as_completion(text: str) -> Completion:
    return Completion(text=text, usage=Usage(1, 1), finish_reason="stop", mean_logprob=None)


@settings(CHAOS, max_examples=100, derandomize=True)
@given(attack_schemas, attack_answers)
@example({"pattern": "(x+x+)+y"}, json.dumps("x" * 100_000))  # froze a worker on `re`
@example(
    {"patternProperties": {"(x+x+)+y": {}}, "additionalProperties": False}, '{"%s": 1}' % ("x" * 64)
)
@example({"$ref": f"http://{LOOPBACK}/s.json"}, '"x"')  # fetched, its content in the error
@example({"x-data": {"$ref": "file:///etc/passwd"}, "$ref": "#/x-data"}, "1")
@example({"allOf": [{}] * 150_000}, "{}")  # 41 s of the meta-schema check
@example({"uniqueItems": True}, json.dumps([{"n": i} for i in range(13_000)]))  # quadratic
@example({"$ref": "#"}, "{}")  # a reference to itself, without end
def test_an_adversarial_schema_costs_a_bounded_time_and_opens_nothing(
    schema: Any, text: str
) -> None:
    with no_network_or_url() as attempts:
        started = time.monotonic()
        try:
            parse_envelope({"feature": "f", "prompt": "x", "output_schema": schema})
            accepted = True
        except InvalidEnvelope as exc:
            assert exc.field == "output_schema" and exc.reason
            accepted = False
        assert time.monotonic() - started < SUBMIT_BOUND_S
        started = time.monotonic()
        try:
            validate(as_completion(text), schema)
        except InvalidOutput as exc:
            assert exc.rule
        except Exception:
            if accepted:
                raise  # an accepted schema: an answer is valid or an InvalidOutput
        assert time.monotonic() - started < VALIDATE_BOUND_S
    assert attempts == []


# ---------------------------------------------------------------------------------------
# A line of bulk submission


@settings(CHAOS, max_examples=400)
@given(documents, defaults, st.booleans(), st.booleans(), st.booleans())
def test_the_fast_path_and_parse_line_agree_with_the_reference(
    doc: Any, defaults: dict[str, Any], ensure_ascii: bool, last: bool, newline: bool
) -> None:
    check_line(as_line(doc, ensure_ascii), defaults, last, newline)


@settings(CHAOS, max_examples=500)
@given(byte_lines, defaults, st.booleans(), st.booleans())
@example(
    b'{"feature":"f","prompt":"x","metadata":{"m":' + b"[" * 5000 + b"]" * 5000 + b"}}",
    {},
    True,
    True,
)  # RecursionError in msgspec
@example(
    b'{"feature":"f","prompt":"x","metadata":{"m":' + b"[" * 253 + b"]" * 253 + b"}}",
    {},
    True,
    True,
)  # accepted by decode, 255 levels deep in the ledger's payload
@example(
    b'{"feature":"f","prompt":"x","metadata":{"m":' + b"[" * 1030 + b"]" * 1030 + b"}}",
    {},
    True,
    True,
)  # read by msgspec, too deep for orjson
@example(b'{"feature":"f","prompt":"x","metadata":{"n":18446744073709551616}}', {}, True, True)
def test_parse_line_decides_any_bytes_as_the_reference_does(
    line: bytes, defaults: dict[str, Any], last: bool, newline: bool
) -> None:
    check_line(line, defaults, last, newline)


# ---------------------------------------------------------------------------------------
# The JSONL file


def expected_lines(content: bytes, limit: int) -> list[RawLine]:
    """The lines of `content` by `bytes.split`: a line ends at "\\n" (its "\\r" before the
    "\\n", or at the end of the input, is not part of it); nothing after a final newline."""
    if not content:
        return []
    pieces = content.split(b"\n")
    final_newline = content.endswith(b"\n")
    if final_newline:
        pieces.pop()
    out = []
    for no, piece in enumerate(pieces, 1):
        data = piece.removesuffix(b"\r")
        oversized = len(data) > limit
        last = no == len(pieces)
        out.append(
            RawLine(no, b"" if oversized else data, len(data), last, not last or final_newline,
                    oversized)
        )  # fmt: skip
    return out


def read_all(content: bytes, limit: int, compress: bool) -> tuple[list[RawLine], str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("in.jsonl.gz" if compress else "in.jsonl")
        path.write_bytes(gzip.compress(content, mtime=0) if compress else content)
        digest = hashlib.sha256()
        lines = list(read_lines(Input(path, path.name, compress), limit, digest))
    return lines, digest.hexdigest()


def read_until_error(blob: bytes, limit: int) -> tuple[list[RawLine], BaseException | None]:
    lines: list[RawLine] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.jsonl.gz"
        path.write_bytes(blob)
        reader: Iterator[RawLine] = read_lines(Input(path, path.name, True), limit)
        try:
            lines.extend(reader)
        except READ_ERRORS as exc:
            return lines, exc
    return lines, None


PIECE = 1 << 20  # producers.jsonl reads an oversized line in pieces of this size
contents = st.one_of(
    st.binary(max_size=200),
    st.lists(
        st.sampled_from([b"\n", b"\r", b"\r\n", b"\n\n", b"\x00", b"\xed\xa0\x80", b"\xff",
                         b'{"feature": "f", "prompt": "x"}', b"\xef\xbb\xbf", b" "])
        | st.binary(max_size=12),
        max_size=40,
    ).map(b"".join),
    st.tuples(
        st.sampled_from([b"", b"{}\n", b"a\r\n"]),
        st.sampled_from([PIECE - 1, PIECE, PIECE + 1, 2 * PIECE + 3]).map(lambda n: b"y" * n),
        st.sampled_from([b"", b"\n", b"\r\n", b"\r", b"\nz"]),
    ).map(b"".join),
)  # fmt: skip
limits = st.one_of(st.integers(0, 24), st.just(MAX_ENVELOPE_BYTES))


@settings(CHAOS, max_examples=300)
@given(contents, limits, st.booleans())
@example(b"abc\r\n", 3, False)  # read as over the limit: the "\r" counted
@example(b"abcd\r\n", 3, False)  # its size counted the "\r"
def test_read_lines_splits_any_bytes_on_newlines(
    content: bytes, limit: int, compress: bool
) -> None:
    lines, digest = read_all(content, limit, compress)
    assert lines == expected_lines(content, limit)
    assert digest == hashlib.sha256(content).hexdigest()


@settings(CHAOS, max_examples=150)
@given(contents, limits, st.data())
def test_a_damaged_gzip_input_fails_only_as_documented(
    content: bytes, limit: int, data: st.DataObject
) -> None:
    packed = gzip.compress(content, mtime=0)
    cut = data.draw(st.integers(0, len(packed)), label="cut")
    lines, error = read_until_error(packed[:cut], limit)
    if cut == len(packed):
        assert error is None and lines == expected_lines(content, limit)
    elif cut > 0:
        assert error is not None, "a truncated gzip stream must not read as complete"
        assert lines == expected_lines(content, limit)[: len(lines)]
    garbage = data.draw(st.binary(max_size=64), label="garbage")
    for blob in (b"\x1f\x8b" + garbage, packed[:cut] + garbage):
        read_until_error(blob, limit)  # anything but READ_ERRORS fails the test
