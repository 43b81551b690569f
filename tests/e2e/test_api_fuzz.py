"""Property-based fuzzing of the HTTP API against its own OpenAPI document (schemathesis):
for every operation, whatever a request holds, within the document (positive) or outside
it (negative: wrong types, missing fields, bad headers), the answer is never a 5xx, and
every error says what it is. With a valid token (so the routes behind auth are reached)
and without one. (Driven through schemathesis' strategies and hypothesis directly: its
pytest plugin does not load under this pytest.)

The same examples each run, so that a run that passes passes again; a deeper, random run:
`TIERFLEET_FUZZ_EXAMPLES=300 TIERFLEET_FUZZ_RANDOM=1 pytest tests/e2e/test_api_fuzz.py
--timeout 1800`."""

from __future__ import annotations

import os
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from tests.e2e.conftest import Api

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
