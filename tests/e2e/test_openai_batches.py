"""The official `openai` SDK against `tierfleet serve`, only its base URL changed: a batch
file uploaded, a batch created, polled to `completed`, its results downloaded; real
workers on simulated models, real Redis and Postgres. And what goes wrong: a bad line, a
file over its caps, another team's batch, a cancel."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from typer.testing import CliRunner

from tests.conftest import Workers, wait_until
from tests.e2e.conftest import Api
from tierfleet.cli import app as cli

pytestmark = pytest.mark.e2e

SENTIMENT = {"type": "object", "properties": {"label": {"type": "string", "enum": [
    "positive", "negative", "neutral", "mixed"]}}, "required": ["label"],
    "additionalProperties": False}  # fmt: skip


def request(custom_id: str, text: str, *, structured: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "You label reviews."},
                     {"role": "user", "content": f"Label this review: {text}"}],
        "max_tokens": 64,
    }  # fmt: skip
    if structured:
        schema = {"name": "sentiment", "schema": SENTIMENT}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def batch_file(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps(request(f"review-{i}", f"#{i}: fine", structured=i % 4 != 3)) + "\n")
    return path


def sdk(api: Api, token: str) -> OpenAI:
    return OpenAI(base_url=f"{api.url}/v1", api_key=token, max_retries=0)


def test_the_openai_sdk_runs_a_batch_to_completed_and_downloads_its_results(
    api: Api, start_workers: Callable[..., Workers], tmp_path: Path
) -> None:
    client = sdk(api, api.token("growth", feature="reviews"))
    path = batch_file(tmp_path / "requests.jsonl", 24)
    uploaded = client.files.create(file=path, purpose="batch")
    assert (uploaded.purpose, uploaded.bytes) == ("batch", path.stat().st_size)
    assert client.files.content(uploaded.id).content == path.read_bytes()

    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"run": "nightly"},
    )  # fmt: skip
    assert batch.status == "in_progress" and batch.request_counts.total == 24
    start_workers("all")

    def done() -> Any:
        got = client.batches.retrieve(batch.id)
        return got if got.status == "completed" else None

    finished = wait_until(done, timeout_s=90, what="the batch to complete")
    assert finished.request_counts.completed == 24 and finished.request_counts.failed == 0
    assert finished.metadata == {"run": "nightly"} and finished.error_file_id is None
    assert finished.output_file_id is not None

    lines = client.files.content(finished.output_file_id).text.splitlines()
    results = [json.loads(line) for line in lines]
    assert [r["custom_id"] for r in results] == [f"review-{i}" for i in range(24)]  # input order
    for i, r in enumerate(results):
        assert r["error"] is None and r["response"]["status_code"] == 200
        body = r["response"]["body"]
        content = body["choices"][0]["message"]["content"]
        if i % 4 != 3:  # the response_format's schema held
            assert json.loads(content)["label"] in SENTIMENT["properties"]["label"]["enum"]
        assert body["usage"]["total_tokens"] > 0 and body["model"]
        assert float(body["tierfleet"]["cost_usd"]) > 0
    assert {r["response"]["body"]["tierfleet"]["tier"] for r in results} <= {"slm", "frontier"}

    with api.ledger.begin() as conn:
        rows = conn.exec_driver_sql(
            "SELECT team, latency, feature, count(*) FROM jobs GROUP BY 1, 2, 3"
        ).all()
    assert rows == [("growth", "batch", "growth/reviews", 24)]
    listed = client.batches.list()
    assert [b.id for b in listed.data] == [batch.id]


def test_a_file_with_bad_lines_is_refused_whole_naming_each_line(api: Api, tmp_path: Path) -> None:
    client = sdk(api, api.token())
    path = tmp_path / "bad.jsonl"
    good = json.dumps(request("a", "fine"))
    dup = json.dumps(request("a", "again"))
    tools = json.dumps({**request("c", "x"), "body": {**request("c", "x")["body"],
                                                         "tools": []}})  # fmt: skip
    path.write_text("\n".join([good, "{not json", dup, tools, ""]) + "\n")
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=path, purpose="batch")
    message = refused.value.body["message"]  # type: ignore[index]
    assert message.startswith("3 invalid lines, nothing submitted")
    assert "line 2: not JSON" in message
    assert "line 3, field 'custom_id': custom_id 'a' is on line 1 too" in message
    assert "line 4, field 'body.tools'" in message
    with api.ledger.begin() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM api_files").scalar_one() == 0

    kept = client.files.create(file=path, purpose="batch", extra_query={"skip_invalid": "true"})
    assert kept.status_details is not None
    assert kept.status_details.startswith("3 invalid lines, left out, 1 kept")
    assert client.files.content(kept.id).text == good + "\n"


def test_files_over_their_caps_are_413(serve_api: Callable[..., Api], tmp_path: Path) -> None:
    small = serve_api(api_max_file_bytes=2000, api_max_batch_lines=3)
    client = sdk(small, small.token())
    for name, n in (("long.jsonl", 4), ("big.jsonl", 3)):
        path = batch_file(tmp_path / name, n)
        if name == "big.jsonl":
            path.write_text(path.read_text().replace("fine", "fine " * 300))
        with pytest.raises(openai.APIStatusError) as refused:
            client.files.create(file=path, purpose="batch")
        assert refused.value.status_code == 413
        assert "over the limit of 3" in str(refused.value) or "2,000 bytes" in str(refused.value)


@pytest.mark.chaos
def test_another_teams_file_and_batch_are_404_as_unknown_ones_and_a_cancel_ends_in_cancelled(
    api: Api, tmp_path: Path
) -> None:
    mine, theirs = sdk(api, api.token("growth")), sdk(api, api.token("search"))
    uploaded = mine.files.create(file=batch_file(tmp_path / "r.jsonl", 5), purpose="batch")

    def not_found(call: Callable[[str], Any], id_: str, what: str) -> None:
        with pytest.raises(openai.NotFoundError) as refused:
            call(id_)
        assert refused.value.body == {"message": f"no {what} with id {id_!r}",  # as unknown
                                      "type": "not_found_error", "param": None,
                                      "code": "not_found"}  # fmt: skip

    create = functools.partial(theirs.batches.create, endpoint="/v1/chat/completions",
                               completion_window="24h")  # fmt: skip
    not_found(lambda id_: create(input_file_id=id_), uploaded.id, "file")
    not_found(theirs.files.retrieve, uploaded.id, "file")
    not_found(theirs.files.content, uploaded.id, "file")
    not_found(theirs.files.retrieve, "file-nope", "file")
    batch = mine.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                completion_window="24h")  # fmt: skip
    not_found(theirs.batches.retrieve, batch.id, "batch")
    not_found(theirs.batches.cancel, batch.id, "batch")
    not_found(mine.batches.retrieve, "batch_nope", "batch")
    with pytest.raises(openai.BadRequestError):
        mine.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                            completion_window="24h")  # fmt: skip

    cancelled = mine.batches.cancel(batch.id)  # no worker has started any
    assert cancelled.status == "cancelled" and cancelled.request_counts.failed == 5
    assert cancelled.output_file_id is None and cancelled.error_file_id is not None
    errors = [json.loads(x) for x in mine.files.content(cancelled.error_file_id).text.splitlines()]
    assert [e["custom_id"] for e in errors] == [f"review-{i}" for i in range(5)]
    assert {e["error"]["code"] for e in errors} == {"job_cancelled"}


def test_tierfleet_submit_reads_the_openai_batch_format(api: Api, tmp_path: Path) -> None:
    path = batch_file(tmp_path / "openai.jsonl", 6)
    result = CliRunner().invoke(cli, ["submit", str(path), "--feature", "reviews", "--json"])
    assert result.exit_code == 0, result.output
    with api.ledger.begin() as conn:
        payloads = [json.loads(p) for (p,) in conn.exec_driver_sql(
            "SELECT payload FROM jobs ORDER BY line").all()]  # fmt: skip
    assert [p["metadata"]["custom_id"] for p in payloads] == [f"review-{i}" for i in range(6)]
    assert payloads[0]["system"] == "You label reviews." and payloads[0]["max_tokens"] == 64
    assert payloads[0]["output_schema"] == SENTIMENT and payloads[3]["output_schema"] is None


def _run_to_completed(client: OpenAI, batch_id: str) -> Any:
    def done() -> Any:
        got = client.batches.retrieve(batch_id)
        return got if got.status == "completed" else None

    return wait_until(done, timeout_s=90, what="the batch to complete")


@pytest.mark.chaos
def test_a_nul_in_a_prompt_or_a_custom_id_leaves_the_output_file_readable(
    api: Api, start_workers: Callable[..., Workers], tmp_path: Path
) -> None:
    client = sdk(api, api.token())
    path = batch_file(tmp_path / "nul.jsonl", 6)
    lines = path.read_text().splitlines()
    lines[2] = json.dumps(request("review-2", "fine\u0000 and then some"))
    lines[4] = json.dumps(request("review-\u00004", "fine"))
    path.write_text("\n".join(lines) + "\n")
    uploaded = client.files.create(file=path, purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    start_workers("all")
    finished = _run_to_completed(client, batch.id)
    assert finished.output_file_id is not None

    content = client.files.content(finished.output_file_id).content
    ids = [json.loads(line)["custom_id"] for line in content.splitlines()]
    assert ids == ["review-0", "review-1", "review-2", "review-3", "review-\u00004", "review-5"]


@pytest.mark.chaos
def test_the_output_file_streams_and_its_size_is_its_length_and_a_cancel_leaves_it_completed(
    api: Api, start_workers: Callable[..., Workers], tmp_path: Path
) -> None:
    client = sdk(api, api.token())
    uploaded = client.files.create(file=batch_file(tmp_path / "r.jsonl", 40), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    start_workers("all")
    finished = _run_to_completed(client, batch.id)
    assert finished.output_file_id is not None
    again = client.batches.cancel(batch.id)  # a finished batch is answered as it is
    assert again.model_dump() == finished.model_dump()
    assert (again.status, again.cancelling_at, again.cancelled_at) == ("completed", None, None)

    for _ in range(2):  # the size as computed, then as recorded
        meta = client.files.retrieve(finished.output_file_id)
        with client.files.with_streaming_response.content(finished.output_file_id) as response:
            assert response.headers.get("transfer-encoding") == "chunked"  # not built whole
            assert "content-length" not in response.headers
            body = response.read()
        assert meta.bytes == len(body) and len(body.splitlines()) == 40


@pytest.mark.chaos
def test_a_custom_id_that_is_not_a_string_is_400_naming_its_line(api: Api, tmp_path: Path) -> None:
    client = sdk(api, api.token())
    good = request("a", "fine")
    envelope = {"prompt": "hi", "metadata": {"custom_id": {"nested": 1}}}  # tierfleet's own
    bad = [{**good, "custom_id": 7}, {**good, "custom_id": {"a": 1}}, {**good, "custom_id": None},
           {**good, "custom_id": ["x"]}, envelope]  # fmt: skip
    path = tmp_path / "ids.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [good, *bad]) + "\n")
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=path, purpose="batch")
    message = refused.value.body["message"]  # type: ignore[index]
    assert message.startswith("5 invalid lines, nothing submitted"), message
    for no in range(2, 7):
        assert f"line {no}, field 'custom_id'" in message, message


@pytest.mark.chaos
def test_a_file_accepted_at_upload_is_accepted_by_its_batch(
    serve_api: Callable[..., Api], tmp_path: Path
) -> None:
    small = serve_api(api_max_batch_lines=3)
    client = sdk(small, small.token())
    path = tmp_path / "blank.jsonl"  # blank lines are not requests: 3 of them, at the cap
    path.write_text("\n".join(["", json.dumps(request("a", "x")), "", "  ",
                               json.dumps(request("b", "y")), json.dumps(request("c", "z")),
                               "\r", ""]) + "\n")  # fmt: skip
    uploaded = client.files.create(file=path, purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    assert batch.request_counts is not None and batch.request_counts.total == 3

    huge = tmp_path / "huge.jsonl"  # a line over the batch's limit is refused at upload
    long_line = json.dumps(request("big", "x" * 1_200_000))
    huge.write_text(json.dumps(request("a", "x")) + "\n" + long_line + "\n")
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=huge, purpose="batch")
    message = refused.value.body["message"]  # type: ignore[index]
    assert "1 invalid line, nothing submitted: line 2: " in message, message
    assert "over the 1,000,000-byte limit" in message
