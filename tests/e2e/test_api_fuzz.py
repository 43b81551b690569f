"""Property-based fuzzing of the HTTP API against its own OpenAPI document (schemathesis):
for every operation, whatever a request holds, within the document (positive) or outside
it (negative: wrong types, missing fields, bad headers), the answer is never a 5xx, and
every error says what it is. With a valid token (so the routes behind auth are reached)
and without one. (Driven through schemathesis' strategies and hypothesis directly: its
pytest plugin does not load under this pytest.) And batch input files made of hostile
lines (custom_ids that are not strings, NULs, lines at and over the size limit, blank
lines, bytes that are not UTF-8): no 5xx, and a file the upload accepts is one its batch
accepts, whose error file reads back.

The same examples each run, so that a run that passes passes again; a deeper, random run:
`TIERFLEET_FUZZ_EXAMPLES=300 TIERFLEET_FUZZ_RANDOM=1 pytest tests/e2e/test_api_fuzz.py
--timeout 1800`."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from producers.api.app import create_app
from tests.e2e.conftest import Api
from tierfleet.envelope import MAX_ENVELOPE_BYTES
from tierfleet.settings import Settings

pytestmark = pytest.mark.e2e
EXAMPLES = int(os.environ.get("TIERFLEET_FUZZ_EXAMPLES", "30"))
RANDOM = bool(os.environ.get("TIERFLEET_FUZZ_RANDOM"))


def fuzz(operation: Any, mode: schemathesis.GenerationMode, bearer: dict[str, str]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
              database=None, derandomize=not RANDOM)  # fmt: skip
    def no_5xx(case: Any) -> None:
        for headers in (bearer, {}):
            response = case.call(headers=headers)
            where = f"{mode.value}: {case.method} {case.formatted_path}"
            assert response.status_code < 500, f"{where}: {response.text[:500]}"
            if response.status_code >= 400:
                assert response.json()["error"]["message"], where

    no_5xx()


def test_no_request_gets_a_server_error(api: Api) -> None:
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    bearer = {"Authorization": f"Bearer {api.token('fuzz', rate_limit='100000/second')}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10  # jobs, files, batches, health
    for operation in operations:
        fuzz(operation, schemathesis.GenerationMode.POSITIVE, bearer)
        try:
            fuzz(operation, schemathesis.GenerationMode.NEGATIVE, bearer)
        except Unsatisfiable:  # nothing to get wrong: no parameters, no body (/healthz)
            assert not operation.path_parameters and not operation.body


def _request(custom_id: Any, prompt: str, size: int | None = None) -> bytes:
    """A request line; with `size`, padded to exactly that many bytes."""
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": body}  # fmt: skip
    data = json.dumps(line).encode()
    if size is None:
        return data
    body["messages"][0]["content"] = prompt + "x" * (size - len(data))
    return json.dumps(line).encode()


_TEXT = st.text(alphabet=st.sampled_from('ab \x00\t\n\u2028\U0001f600\\"'), max_size=20)
# Lines a batch takes: NULs and escapes in prompts and custom_ids, blank lines, lines at
# the size limit (each custom_id made unique when the file is put together).
GOOD = st.one_of(
    st.tuples(_TEXT, _TEXT.map(lambda t: t + "x")),
    st.tuples(st.just("at-limit"), st.just("x"), st.integers(MAX_ENVELOPE_BYTES - 3,
                                                             MAX_ENVELOPE_BYTES)),
    st.sampled_from([b"", b" ", b"\r", b"\t"]),
)  # fmt: skip
# Lines it refuses, one of which may be in a file.
BAD = st.one_of(
    st.builds(_request, st.one_of(st.integers(), st.none(), st.booleans(), st.floats(),
                                  st.lists(st.integers(), max_size=2), st.just(""),
                                  st.dictionaries(st.text(max_size=3), st.integers()),
                                  st.just("x" * 201)), _TEXT),
    st.builds(lambda n: _request("big", "x", n), st.integers(MAX_ENVELOPE_BYTES + 1,
                                                               MAX_ENVELOPE_BYTES + 3)),
    st.sampled_from([b"{}", b"null", b"[1]", b"\xff\xfe", b'{"prompt": "hi", "metadata": '
                     b'{"custom_id": {"a": 1}}}']),
    st.binary(min_size=1, max_size=12),
)  # fmt: skip


def _file(good: list[Any], bad: bytes | None, at: int, crlf: bool) -> bytes:
    lines = [g if isinstance(g, bytes) else _request(f"{i}{g[0]}", *g[1:])
             for i, g in enumerate(good)]  # fmt: skip
    if bad is not None:
        lines.insert(at % (len(lines) + 1), bad)
    return (b"\r\n" if crlf else b"\n").join(lines) + b"\n"


FILES = st.builds(_file, st.lists(GOOD, min_size=1, max_size=6), st.one_of(st.none(), BAD),
                  st.integers(0, 6), st.booleans())  # fmt: skip


def test_hostile_batch_files_get_no_server_error_and_upload_agrees_with_create(
    request: pytest.FixtureRequest,
) -> None:
    config: Settings = request.getfixturevalue("settings")  # the name hypothesis' takes here
    with TestClient(create_app(config)) as http:  # a 5xx would raise here
        from producers.api import tokens

        token = tokens.create(http.app.state.api.ledger, "fuzz", rate_limit="100000/second")[1]  # type: ignore[attr-defined]
        auth = {"Authorization": f"Bearer {token}"}

        @given(content=FILES)
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None, derandomize=not RANDOM)  # fmt: skip
        def no_5xx(content: bytes) -> None:
            up = http.post("/v1/files", headers=auth, data={"purpose": "batch"},
                           files={"file": ("f.jsonl", content)})  # fmt: skip
            assert up.status_code in (200, 400, 413), up.text
            if up.status_code != 200:
                assert up.json()["error"]["message"]
                return
            made = http.post("/v1/batches", headers=auth, json={
                "input_file_id": up.json()["id"], "endpoint": "/v1/chat/completions",
                "completion_window": "24h"})  # fmt: skip
            assert made.status_code == 200, made.text  # accepted at upload: accepted here
            batch = http.post(f"/v1/batches/{made.json()['id']}/cancel", headers=auth).json()
            assert batch["status"] == "cancelled", batch
            errors = http.get(f"/v1/files/{batch['error_file_id']}/content", headers=auth)
            assert errors.status_code == 200, errors.text
            size = http.get(f"/v1/files/{batch['error_file_id']}", headers=auth).json()["bytes"]
            assert size == len(errors.content)
            assert len(errors.content.splitlines()) == batch["request_counts"]["total"]

        no_5xx()
