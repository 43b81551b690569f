"""Attacks through a job's `output_schema`, each against the real thing.

1. A pattern that backtracks catastrophically in Python's `re` (`(x+x+)+y`), in `pattern`,
   as a `patternProperties` key, or reached through `additionalProperties`, does not freeze
   the process that validates an answer: a worker process (a child here) finishes at once.
2. A `$ref` that points outside the schema (a loopback HTTP server, a file) is refused at
   submission, naming the field and the ref; a payload that bypassed submission is an
   invalid answer. In neither case does the server receive a request, or does anything of
   what it (or the file) holds show in an error.
3. A schema too large or too complex to check cheaply is refused, naming the limit, before
   the meta-schema check runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from producers.bulk import parse_line
from producers.jsonl import RawLine
from tests.conftest import ROOT
from tierfleet.envelope import parse_envelope
from tierfleet.errors import InvalidEnvelope, InvalidOutput
from tierfleet.prices import Usage
from workers.backends.base import Completion
from workers.validation import validate

pytestmark = pytest.mark.chaos

SECRET = "LEAKED-7731-d0c5"  # what the server and the file hold: never in an error
CHILD_TIMEOUT_S = 15.0  # a worker busy longer than this on one answer counts as frozen
CHILD = """
import json, sys, time
from tierfleet.errors import InvalidOutput
from tierfleet.prices import Usage
from workers.backends.base import Completion
from workers.validation import validate

schema, text = json.load(sys.stdin)
started = time.monotonic()
try:
    validate(Completion(text=text, usage=Usage(1, 1), finish_reason="stop",
                        mean_logprob=None), schema)
    outcome = "valid"
except InvalidOutput as exc:
    outcome = exc.rule
print(json.dumps([outcome, time.monotonic() - started]))
"""


def answer(text: str) -> Completion:
    return Completion(text=text, usage=Usage(10, 5), finish_reason="stop", mean_logprob=None)


def envelope(schema: Any) -> dict[str, Any]:
    return {"feature": "f", "prompt": "x", "output_schema": schema}


def validate_in_a_worker_process(schema: Any, text: str) -> tuple[str, float]:
    """The rule (or "valid") and the seconds a fresh process took to validate `text`."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD],
            input=json.dumps([schema, text]),
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            cwd=ROOT,
            check=True,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"validating one answer still ran after {CHILD_TIMEOUT_S}s: frozen")
    outcome, seconds = json.loads(done.stdout)
    return outcome, seconds


# ---------------------------------------------------------------------------------------
# 1. Catastrophic backtracking

EVIL = "(x+x+)+y"


@pytest.mark.parametrize(
    ("schema", "value", "outcome"),
    [
        ({"properties": {"a": {"pattern": EVIL}}}, {"a": "x" * 50_000}, "schema"),
        ({"patternProperties": {EVIL: False}}, {"x" * 64: 1}, "valid"),  # not matched
        ({"patternProperties": {EVIL: {}}, "additionalProperties": False}, {"x" * 64: 1}, "schema"),
        ({"propertyNames": {"pattern": EVIL}}, {"x" * 64: 1}, "schema"),
    ],
    ids=["pattern", "patternProperties", "additionalProperties", "propertyNames"],
)
def test_a_nested_quantifier_does_not_freeze_the_worker(
    schema: Any, value: Any, outcome: str
) -> None:
    parse_envelope(envelope(schema))  # accepted at submission: re2 runs it in linear time
    got, seconds = validate_in_a_worker_process(schema, json.dumps(value))
    assert got == outcome  # "schema": an invalid answer, escalated, not a lost worker
    assert seconds < 1.0


def test_a_long_array_of_distinct_objects_is_checked_for_uniqueness_in_linear_time() -> None:
    items = [{"n": i} for i in range(13_000)]  # about 110 KB, under max_tokens
    outcome, seconds = validate_in_a_worker_process({"uniqueItems": True}, json.dumps(items))
    assert outcome == "valid"
    assert seconds < 2.0
    outcome, _ = validate_in_a_worker_process({"uniqueItems": True}, json.dumps([*items, {"n": 0}]))
    assert outcome == "schema"


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"properties": {"a": {"pattern": "(?=x)x"}}}, "properties.a.pattern"),
        ({"patternProperties": {"(a)\\1": {}}}, "patternProperties"),
        ({"$defs": {"d": {"pattern": "a{1001}"}}}, "$defs.d.pattern"),
        ({"pattern": "a" * 1001}, "pattern"),
    ],
    ids=["lookahead", "backreference", "repetition", "length"],
)
def test_a_pattern_the_linear_engine_cannot_run_is_refused_naming_where(
    schema: Any, where: str
) -> None:
    with pytest.raises(InvalidEnvelope) as info:
        parse_envelope(envelope(schema))
    assert info.value.field == "output_schema"
    assert where in info.value.reason


# ---------------------------------------------------------------------------------------
# 2. References outside the schema


class Listener:
    """An HTTP server on loopback that records every request and answers with a schema
    holding `SECRET`."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.path)
                body = json.dumps({"enum": [SECRET]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/schema+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret.json"
    path.write_text(json.dumps({"enum": [SECRET]}))
    return path


def hidden(ref: str) -> list[dict[str, Any]]:
    """`ref` at the root and hidden in the places a walk might miss."""
    node = {"$ref": ref}
    return [
        node,
        {"type": "object", "properties": {"a": {"properties": {"b": node}}}},
        {"type": "array", "items": {"items": node}},
        {"$defs": {"x": node}, "$ref": "#/$defs/x"},
        {"allOf": [{}, {"anyOf": [{"type": "string"}, node]}]},
        {"$dynamicRef": ref},
        {"x-data": node, "$ref": "#/x-data"},  # a ref inside a keyword no draft defines
    ]


def refs(listener: Listener, secret_file: Path) -> list[str]:
    host = listener.url.removeprefix("http://")
    return [
        f"{listener.url}/schema.json",
        f"{listener.url}/schema.json#/enum",
        f"HTTP://{host}/upper",
        f"//{host}/no-scheme",
        secret_file.as_uri(),
        f"file://{secret_file}",
        f"https://{host}/tls",
    ]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jsonschema's remote-ref warning
def test_a_ref_outside_the_schema_is_refused_at_submission_and_nothing_is_fetched(
    listener: Listener, secret_file: Path
) -> None:
    refused = 0
    for ref in refs(listener, secret_file):
        for schema in hidden(ref):
            for submit in (submit_one, submit_in_bulk):
                with pytest.raises(InvalidEnvelope) as info:
                    submit(envelope(schema))
                assert info.value.field == "output_schema"
                assert repr(ref)[:60] in info.value.reason or ref[:60] in info.value.reason
                assert SECRET not in str(info.value)
                refused += 1
    assert listener.requests == []
    assert refused == 2 * 7 * 7


@pytest.mark.parametrize(
    "ref", ["other.json", "urn:example:unknown", "urn:tierfleet:output:no_such", "#/$defs/x"]
)
def test_a_ref_to_nothing_the_schema_holds_is_refused(ref: str) -> None:
    schema = {"$ref": ref} if ref.startswith("#") else {"$defs": {"x": {}}, "$ref": ref}
    if ref == "#/$defs/x":  # a fragment is the schema's own: accepted
        parse_envelope(envelope({"$defs": {"x": {"type": "string"}}, "$ref": ref}))
        return
    with pytest.raises(InvalidEnvelope, match="output_schema"):
        parse_envelope(envelope(schema))


def test_a_ref_to_an_id_the_schema_declares_or_to_a_shipped_schema_is_accepted() -> None:
    own = {
        "$id": "https://example.com/root.json",
        "$defs": {"s": {"$id": "https://example.com/s.json", "type": "string"}},
        "properties": {"a": {"$ref": "https://example.com/s.json"}},
    }
    parse_envelope(envelope(own))
    with pytest.raises(InvalidOutput):
        validate(answer('{"a": 5}'), own)
    shipped = {"properties": {"review": {"$ref": "urn:tierfleet:output:sentiment"}}}
    parse_envelope(envelope(shipped))
    assert validate(answer('{"review": {"label": "positive"}}'), shipped)
    with pytest.raises(InvalidOutput, match="not one of"):
        validate(answer('{"review": {"label": "ecstatic"}}'), shipped)


def test_an_id_declared_in_data_does_not_make_a_remote_ref_local(listener: Listener) -> None:
    target = f"{listener.url}/y.json"
    schema = {"const": {"$id": target}, "$ref": target}
    with pytest.raises(InvalidEnvelope, match="output_schema"):
        parse_envelope(envelope(schema))
    with pytest.raises(InvalidOutput) as info:
        validate(answer("{}"), schema)
    assert info.value.rule == "schema_ref"
    assert listener.requests == []


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jsonschema's remote-ref warning
def test_a_ref_that_bypassed_submission_is_an_invalid_answer_and_nothing_is_fetched(
    listener: Listener, secret_file: Path
) -> None:
    for ref in refs(listener, secret_file):
        for schema in hidden(ref):
            value = {"a": {"b": "x"}} if "properties" in schema else ["x"]
            try:
                validate(answer(json.dumps(value)), schema)
            except InvalidOutput as exc:
                assert SECRET not in str(exc), (ref, schema)
                assert exc.rule in ("schema_ref", "schema"), (ref, exc)
    assert listener.requests == []


def submit_one(doc: dict[str, Any]) -> Any:
    return parse_envelope(doc)


def submit_in_bulk(doc: dict[str, Any]) -> Any:
    line = json.dumps(doc).encode()
    return parse_line(RawLine(1, line, len(line), True, True), {}, "b-attack")


# ---------------------------------------------------------------------------------------
# 3. The cost of one schema


def test_an_allof_of_150000_entries_is_refused_at_once() -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidEnvelope) as info:
        parse_envelope(envelope({"allOf": [{}] * 150_000}))
    seconds = time.perf_counter() - started
    print(f"parse_envelope refused a 150,000-entry allOf in {seconds:.4f}s")
    assert info.value.field == "output_schema"
    assert "bytes" in info.value.reason


@pytest.mark.parametrize(
    ("schema", "limit"),
    [
        ({"allOf": [{}] * 1_001}, "subschemas"),
        ({"enum": [0] * 20_000}, "values"),
        ({"description": "x" * 120_000}, "bytes"),
    ],
    ids=["wide", "many-values", "large"],
)
def test_a_schema_over_a_limit_is_refused_naming_it(schema: Any, limit: str) -> None:
    with pytest.raises(InvalidEnvelope) as info:
        parse_envelope(envelope(schema))
    assert info.value.field == "output_schema"
    assert limit in info.value.reason


def test_a_schema_nested_too_deep_is_refused_naming_the_limit() -> None:
    schema: dict[str, Any] = {}
    for _ in range(100):
        schema = {"items": schema}
    with pytest.raises(InvalidEnvelope) as info:
        parse_envelope(envelope(schema))
    assert "deep" in info.value.reason
