"""The HTTP API on a real port (uvicorn in a thread), real Redis and Postgres, real
worker processes on simulated models: curl as the client that is not Python, bearer
tokens, their failures, limits and bad input."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from producers.api.app import create_app
from tests.conftest import Workers, wait_until
from tests.e2e.conftest import Api
from tierfleet.cli import app as cli
from tierfleet.envelope import MAX_ENVELOPE_BYTES
from tierfleet.settings import Settings

pytestmark = pytest.mark.e2e

ENVELOPE = {"feature": "reviews", "prompt": "Classify: 'great value, fast delivery'",
            "output_schema": "sentiment"}  # fmt: skip


def test_a_job_submitted_with_curl_runs_and_is_read_back(
    api: Api, start_workers: Callable[..., Workers]
) -> None:
    token = api.token("growth", feature="reviews")
    status, body, _ = api.curl(
        "POST", "/v1/jobs", token=token,
        body=json.dumps({"prompt": ENVELOPE["prompt"], "output_schema": "sentiment"}).encode(),
    )  # fmt: skip
    assert status == 202, body
    job_id = body["id"]
    start_workers("all")

    def finished() -> Any:
        code, job, _ = api.curl("GET", f"/v1/jobs/{job_id}", token=token)
        assert code == 200, job
        return job if job["status"] in ("succeeded", "failed") else None

    job = wait_until(finished, timeout_s=60, what="the job to finish")
    assert job["status"] == "succeeded"
    assert job["feature"] == "growth/reviews"  # the token's default, in the team's space
    assert job["team"] == "growth"
    assert job["result"]["label"] in ("positive", "negative", "neutral", "mixed")
    assert float(job["cost_usd"]) == sum(float(a["cost_usd"]) for a in job["attempts"]) > 0
    assert job["attempts"][-1]["outcome"] == "succeeded"


def test_health_readiness_and_the_openapi_document(api: Api) -> None:
    assert api.curl("GET", "/healthz")[:2] == (200, {"status": "ok"})
    assert api.curl("GET", "/readyz")[:2] == (200, {"ready": True, "redis": "ok", "postgres": "ok"})
    status, doc, _ = api.curl("GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/healthz", "/readyz"} <= set(doc["paths"])
    body = doc["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert "feature" in body["schema"]["properties"]  # the envelope's own schema


@pytest.mark.chaos
def test_auth_failures_are_401_with_a_reason_and_another_teams_job_is_404(api: Api) -> None:
    job = json.dumps(ENVELOPE).encode()
    cases = {
        "missing_token": {},
        "invalid_auth": {"Authorization": "Basic dXNlcjpwYXNz"},
        "bad_token": {"Authorization": "Bearer tf_not-a-token-of-this-fleet"},
    }
    for code, headers in cases.items():
        status, body, _ = api.curl("POST", "/v1/jobs", body=job, headers=headers)
        assert (status, body["error"]["code"]) == (401, code), body
        assert body["error"]["type"] == "authentication_error" and body["error"]["message"]

    mine, theirs = api.token("growth"), api.token("search")
    status, body, _ = api.curl("POST", "/v1/jobs", token=mine, body=job)
    assert status == 202
    status, other, _ = api.curl("GET", f"/v1/jobs/{body['id']}", token=theirs)
    assert status == 404  # exactly as for an id that does not exist: nothing of theirs
    assert other["error"] == {
        "message": f"no job with id {body['id']!r}",
        "type": "not_found_error",
        "param": None,
        "code": "not_found",
    }
    status, unknown, _ = api.curl("GET", "/v1/jobs/no-such-job", token=mine)
    assert status == 404
    assert unknown["error"] == {**other["error"], "message": "no job with id 'no-such-job'"}


def test_tokens_from_the_command_line(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    runner = CliRunner()
    made = runner.invoke(cli, ["tokens", "create", "--team", "growth", "--feature", "reviews"])
    assert made.exit_code == 0, made.output
    token = made.stdout.strip().splitlines()[-1]
    assert token.startswith("tf_") and len(token) > 40
    assert api.curl("POST", "/v1/jobs", token=token, body=b'{"prompt": "hi"}')[0] == 202

    listed = runner.invoke(cli, ["tokens", "list", "--json"])
    assert listed.exit_code == 0 and token not in listed.stdout  # never the token itself
    (row,) = json.loads(listed.stdout)
    assert (row["team"], row["feature"], row["revoked_at"]) == ("growth", "reviews", None)
    assert token.startswith(row["prefix"])
    with api.ledger.begin() as conn:  # nor in the ledger: its SHA-256 alone
        assert token not in json.dumps([list(r) for r in conn.exec_driver_sql(
            "SELECT * FROM api_tokens").all()], default=str)  # fmt: skip

    revoked = runner.invoke(cli, ["tokens", "revoke", row["id"]])
    assert revoked.exit_code == 0, revoked.output
    status, body, _ = api.curl("POST", "/v1/jobs", token=token, body=b'{"prompt": "hi"}')
    assert (status, body["error"]["code"]) == (401, "revoked")
    assert token not in caplog.text and token[len(row["prefix"]) :] not in revoked.output
    assert runner.invoke(cli, ["tokens", "revoke", "tok_nope"]).exit_code == 4
    bad = runner.invoke(cli, ["tokens", "create", "--team", "a b"])
    assert bad.exit_code == 2 and "team 'a b'" in bad.output
    bad = runner.invoke(cli, ["tokens", "create", "--team", "t", "--rate-limit", "fast"])
    assert bad.exit_code == 2 and "'fast' is not a rate" in bad.output


def test_idempotency_keys_are_per_team(api: Api) -> None:
    growth, search = api.token("growth"), api.token("search")
    job = json.dumps(ENVELOPE).encode()
    key = {"Idempotency-Key": "nightly-2026-12-03-17"}
    first = api.curl("POST", "/v1/jobs", token=growth, body=job, headers=key)[1]["id"]
    again = api.curl("POST", "/v1/jobs", token=growth, body=job, headers=key)[1]["id"]
    other = api.curl("POST", "/v1/jobs", token=search, body=job, headers=key)[1]["id"]
    assert first == again != other
    in_body = json.dumps({**ENVELOPE, "idempotency_key": "nightly-2026-12-03-17"}).encode()
    assert api.curl("POST", "/v1/jobs", token=growth, body=in_body)[1]["id"] == first
    status, body, _ = api.curl(
        "POST", "/v1/jobs", token=growth, body=in_body, headers={"Idempotency-Key": "other"}
    )
    assert (status, body["error"]["code"]) == (400, "idempotency_key_mismatch")
    # an id another team's job holds names a job of the sender's own
    status, body, _ = api.curl(
        "POST", "/v1/jobs", token=search, body=json.dumps({**ENVELOPE, "id": first}).encode()
    )
    assert status == 202 and body["id"] == f"search:{first}"


def test_bad_input_is_400_or_413_and_names_the_problem(api: Api) -> None:
    token = api.token()
    status, body, _ = api.curl(
        "POST", "/v1/jobs", token=token, body=b'{"feature": "x",\n "prompt": }'
    )
    assert (status, body["error"]["code"]) == (400, "invalid_json")
    assert "line 2" in body["error"]["message"]
    status, body, _ = api.curl("POST", "/v1/jobs", token=token, body=b"[1, 2]")
    assert (status, body["error"]["code"]) == (400, "invalid_json")
    status, body, _ = api.curl(
        "POST", "/v1/jobs", token=token,
        body=json.dumps({**ENVELOPE, "max_tokens": "many"}).encode(),
    )  # fmt: skip
    assert (status, body["error"]["code"], body["error"]["param"]) == (
        400, "invalid_envelope", "max_tokens"
    )  # fmt: skip
    for path in ("/v1/jobs/a%00b", "/v1/batches?after=%00", "/v1/files/%01"):  # no NUL in ids
        status, body, _ = api.curl("GET", path, token=token)
        assert (status, body["error"]["code"]) == (400, "invalid_request"), path
    huge = json.dumps({**ENVELOPE, "prompt": "x" * MAX_ENVELOPE_BYTES}).encode()
    status, body, _ = api.curl("POST", "/v1/jobs", token=token, body=huge)
    assert (status, body["error"]["code"]) == (413, "too_large")
    with api.ledger.begin() as conn:  # nothing half-submitted
        assert conn.exec_driver_sql("SELECT count(*) FROM jobs").scalar_one() == 0


def test_a_token_over_its_rate_limit_gets_429_with_retry_after(api: Api) -> None:
    token = api.token(rate_limit="3/minute")
    codes = [api.curl("GET", "/v1/jobs/none", token=token) for _ in range(4)]
    assert [c[0] for c in codes] == [404, 404, 404, 429]
    _, body, headers = codes[-1]
    assert (
        body["error"]["type"] == "rate_limit_error" and "3 per 1 minute" in body["error"]["message"]
    )
    assert 1 <= int(headers["retry-after"]) <= 60
    assert api.curl("GET", "/v1/jobs/none", token=api.token())[0] == 404  # another token's own


def test_readyz_names_the_service_that_does_not_answer(settings: Settings) -> None:
    down = redis.Redis(host="127.0.0.1", port=_closed_port(), socket_timeout=1)
    with TestClient(create_app(settings, redis_client=down)) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json() == {"ready": False, "redis": "error: ConnectionError",
                                   "postgres": "ok"}  # fmt: skip
        assert client.get("/healthz").status_code == 200  # the process itself is fine


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when this returns
