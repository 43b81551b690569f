"""OpenAI-compatible files and batches: code written against `client.batches.create(...)`
of the official `openai` SDK runs on the fleet with only its base URL changed.

    POST /v1/files                  upload a batch input (purpose `batch`); checked whole
    GET  /v1/files/{id}             the file object
    GET  /v1/files/{id}/content     its bytes; for a batch's output or error file, the
                                    results in OpenAI's format, one line per custom_id
    POST /v1/batches                run an uploaded file: each request becomes a job
    GET  /v1/batches                the team's batches, newest first
    GET  /v1/batches/{id}           status and request counts, in OpenAI's shape
    POST /v1/batches/{id}/cancel    unstarted requests are cancelled; running ones finish

Each request is a tierfleet job like any other (routed by triage, validated against its
`response_format` schema, escalated, cost-accounted), with `latency: batch`; the batch is
a tierfleet batch (`tierfleet status`). Its status is read from its jobs: `in_progress`
until every job is terminal, then `completed` (`cancelled` after a cancel); `validating`
while its jobs are being written (`producers.api.batch_submit`: idempotent on an
Idempotency-Key, and finished by the next read if the server died mid-create).
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, StringConstraints
from sqlalchemy import func, select

from producers import openai_batch as oa
from producers.api import batch_files, batch_submit
from producers.api.common import (
    PRINTABLE,
    Api,
    ApiError,
    Caller,
    PathId,
    QueryId,
    documented,
    unavailable,
)
from producers.api.tokens import TokenInfo
from producers.batches import cancel as cancel_batch
from tierfleet.constants import ApiBatchState, JobStatus
from tierfleet.models import ApiBatch, ApiFile, Job

_Row = TypeVar("_Row", ApiFile, ApiBatch)
OUT, ERR = "file-out-", "file-err-"
WINDOW = dt.timedelta(hours=24)
ENDED = frozenset({"completed", "failed", "cancelled", "expired"})  # a cancel changes nothing
JSONL = "application/jsonl"


MetaKey = Annotated[str, StringConstraints(max_length=64, pattern=PRINTABLE)]
MetaValue = Annotated[str, StringConstraints(max_length=512, pattern=r"^[^\x00]*$")]
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=200,
           description="A create sent again with the same key returns the same batch."),
]  # fmt: skip


class CreateBatch(BaseModel):
    """`POST /v1/batches`, as OpenAI's API takes it."""

    input_file_id: str = Field(max_length=64, pattern=PRINTABLE)
    endpoint: str = Field(max_length=64, description=f"{oa.ENDPOINT} (the one supported)")
    completion_window: str = Field(max_length=16, description="24h")
    metadata: dict[MetaKey, MetaValue] | None = Field(
        None, max_length=16, description="Up to 16 keys of 64 characters, values of 512"
    )


def add_routes(app: FastAPI) -> None:
    """The routes, on `app` (whose `state.api` is the `Api`)."""

    def api_of(request: Request) -> Api:
        return request.app.state.api  # type: ignore[no-any-return]

    @app.post("/v1/files", tags=["batches"], responses=documented(400, 401, 413, 429, 503))
    def upload_file(
        request: Request,
        who: Caller,
        file: Annotated[UploadFile, File(description="The batch input, OpenAI's JSONL")],
        purpose: Annotated[str, Form(max_length=32, description="batch")],
        skip_invalid: Annotated[
            bool, Query(description="Keep the valid lines of a file with bad ones.")
        ] = False,
    ) -> dict[str, Any]:
        """Upload a batch input file. Every line is checked now, by the rules its batch
        is submitted by: a file with a bad line is refused whole, each error with its
        line number, and nothing is kept; with `skip_invalid=true` the valid lines are
        kept and the file's `status_details` names the ones left out."""
        api = api_of(request)
        if purpose != "batch":
            raise ApiError(400, f"purpose must be 'batch', not {purpose!r}", code="invalid_purpose",
                        param="purpose")  # fmt: skip
        cap = api.settings.api_max_file_bytes
        content = file.file.read(cap + 1)
        if len(content) > cap:
            raise ApiError(413, f"the file is over its limit of {cap:,} bytes", code="too_large")
        checked = batch_files.check(content, batch_files.options_for(
                                        who.feature, team=who.team,
                                        tiers=api.settings.fleet.names),
                                    api.settings.api_max_batch_lines, skip_invalid)  # fmt: skip
        row = ApiFile(
            id="file-" + secrets.token_hex(12), team=who.team, purpose=purpose,
            filename=_filename(file.filename), size=len(checked.content),
            lines=checked.requests, content=checked.content,
        )  # fmt: skip
        with api.ledger.session() as s:
            s.add(row)
            s.flush()
            s.refresh(row)
            made = _file_object(row.id, row.size, row.created_at, row.filename, row.purpose)
        if checked.skipped:
            made["status_details"] = batch_files.summary(
                checked.skipped, len(checked.skipped), kept=checked.requests
            )
        return made

    @app.get("/v1/files/{file_id}", tags=["batches"], responses=documented(401, 404, 429))
    def get_file(request: Request, file_id: PathId, who: Caller) -> dict[str, Any]:
        """A file object: an uploaded input, or a batch's output or error file."""
        api = api_of(request)
        if file_id.startswith((OUT, ERR)):
            batch = _results_of(api, who, file_id)
            size = batch_files.size(api.ledger, batch, errors_only=file_id.startswith(ERR))
            return _file_object(file_id, size, batch.created_at, f"{file_id}.jsonl",
                                "batch_output")  # fmt: skip
        row = _own_file(api, who, file_id)
        return _file_object(row.id, row.size, row.created_at, row.filename, row.purpose)

    @app.get("/v1/files/{file_id}/content", tags=["batches"],
             responses=documented(401, 404, 429))  # fmt: skip
    def file_content(request: Request, file_id: PathId, who: Caller) -> StreamingResponse:
        """The file's bytes, streamed. A batch's output file has one line per request
        answered, in input order, as OpenAI writes them (`custom_id`, `response.body`, a
        `chat.completion`); its error file one per request that failed or was cancelled."""
        api = api_of(request)
        if file_id.startswith((OUT, ERR)):
            batch = _results_of(api, who, file_id)
            lines = batch_files.results(api.ledger, batch, errors_only=file_id.startswith(ERR))
            return StreamingResponse(lines, media_type=JSONL)
        row = _own_file(api, who, file_id)
        return StreamingResponse(batch_files.upload_content(api.ledger, row), media_type=JSONL)

    @app.post("/v1/batches", tags=["batches"],
              responses=documented(400, 401, 404, 409, 429, 503))  # fmt: skip
    def create_batch(
        request: Request, body: CreateBatch, who: Caller, idempotency_key: IdempotencyKey = None
    ) -> dict[str, Any]:
        """Run an uploaded file: each request becomes a job, routed like any other. The
        same create sent again with the same Idempotency-Key is the same batch."""
        api = api_of(request)
        if body.endpoint != oa.ENDPOINT:
            raise ApiError(400, f"endpoint must be {oa.ENDPOINT}, not {body.endpoint!r}",
                        code="invalid_endpoint", param="endpoint")  # fmt: skip
        if body.completion_window != "24h":
            raise ApiError(400, "completion_window must be '24h'", code="invalid_window",
                        param="completion_window")  # fmt: skip
        source = _own_file(api, who, body.input_file_id)
        if source.purpose != "batch":
            raise ApiError(400, f"file {source.id} is not a batch input", code="invalid_file",
                        param="input_file_id")  # fmt: skip
        fields = {"input_file_id": source.id, "endpoint": body.endpoint,
                  "completion_window": body.completion_window, "meta": body.metadata,
                  "requests": source.lines}  # fmt: skip
        return _batch_object(api, batch_submit.create(api, who, fields, idempotency_key))

    @app.get("/v1/batches", tags=["batches"], responses=documented(401, 429))
    def list_batches(
        request: Request,
        who: Caller,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        after: QueryId = None,
    ) -> dict[str, Any]:
        """The team's batches, newest first (`after`: the last id of the previous page)."""
        api = api_of(request)
        query = select(ApiBatch).where(ApiBatch.team == who.team)
        with api.ledger.session() as s:
            if after is not None:
                cursor = s.get(ApiBatch, after)
                if cursor is None or cursor.team != who.team:
                    raise _not_found("batch", after)
                query = query.where(ApiBatch.created_at < cursor.created_at)
            rows = list(
                s.execute(query.order_by(ApiBatch.created_at.desc()).limit(limit + 1)).scalars()
            )
        data = [_batch_object(api, batch_submit.settle(api, r)) for r in rows[:limit]]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return {"object": "list", "data": data, "first_id": first, "last_id": last,
                "has_more": len(rows) > limit}  # fmt: skip

    @app.get("/v1/batches/{batch_id}", tags=["batches"], responses=documented(401, 404, 429))
    def get_batch(request: Request, batch_id: PathId, who: Caller) -> dict[str, Any]:
        """A batch's status and request counts, in OpenAI's shape."""
        api = api_of(request)
        return _batch_object(api, _own_batch(api, who, batch_id))

    @app.post("/v1/batches/{batch_id}/cancel", tags=["batches"],
              responses=documented(401, 404, 429, 503))  # fmt: skip
    def cancel(request: Request, batch_id: PathId, who: Caller) -> dict[str, Any]:
        """Cancel: requests not yet started are cancelled, running ones finish; the batch
        is `cancelling` until then, and `cancelled` after. A batch that has ended is
        answered as it is."""
        api = api_of(request)
        row = batch_submit.settle(api, _owned(api, who, ApiBatch, "batch", batch_id), wait=True)
        shown = _batch_object(api, row)
        if shown["status"] in ENDED:
            return shown
        if row.state != ApiBatchState.SUBMITTED:  # its submission failed again just now
            raise unavailable(f"the submission of batch {batch_id} (Redis or Postgres)")
        cancel_batch(api.ledger, row.batch_id)
        with api.ledger.session() as s:
            live = s.get_one(ApiBatch, batch_id)
            if live.cancelling_at is None:
                live.cancelling_at = dt.datetime.now(dt.UTC)
        return _batch_object(api, _get_batch(api, batch_id))


def _own_file(api: Api, who: TokenInfo, file_id: str) -> ApiFile:
    return _owned(api, who, ApiFile, "file", file_id)


def _get_batch(api: Api, batch_id: str) -> ApiBatch:
    with api.ledger.session() as s:
        return s.get_one(ApiBatch, batch_id)


def _own_batch(api: Api, who: TokenInfo, batch_id: str) -> ApiBatch:
    """The team's batch, its submission finished if its creator died."""
    return batch_submit.settle(api, _owned(api, who, ApiBatch, "batch", batch_id))


def _results_of(api: Api, who: TokenInfo, file_id: str) -> ApiBatch:
    """The batch whose output or error file `file_id` is (404 as a file, like any)."""
    row = _owned(api, who, ApiBatch, "file", "batch_" + file_id[len(OUT) :], shown=file_id)
    return batch_submit.settle(api, row)


def _owned(
    api: Api, who: TokenInfo, model: type[_Row], what: str, id_: str, shown: str | None = None
) -> _Row:
    """The row, when the caller's team owns it; else 404 naming `shown` (or the id), the
    same for another team's row as for none (nothing says that the id exists)."""
    with api.ledger.session() as s:
        row = s.get(model, id_)
    if row is None or row.team != who.team:
        raise _not_found(what, shown or id_)
    return row


def _file_object(
    file_id: str, size: int, created: dt.datetime, filename: str, purpose: str
) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "bytes": size, "created_at": _epoch(created),
            "filename": filename, "purpose": purpose, "status": "processed",
            "expires_at": None, "status_details": None}  # fmt: skip


def _epoch(moment: dt.datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def _status(row: ApiBatch, finished: bool) -> str:
    if row.state == ApiBatchState.SUBMITTING:
        return "validating"
    if row.state == ApiBatchState.FAILED:
        return "failed"
    if row.cancelling_at is not None:
        return "cancelled" if finished else "cancelling"
    return "completed" if finished else "in_progress"


def _batch_object(api: Api, row: ApiBatch) -> dict[str, Any]:
    in_batch = Job.batch_id == row.batch_id
    with api.ledger.session() as s:
        counts = dict(s.execute(select(Job.status, func.count()).where(in_batch)
                                .group_by(Job.status)).all())  # fmt: skip
        last = s.execute(select(func.max(Job.finished_at)).where(in_batch)).scalar_one()
    by = {JobStatus(k).value: n for k, n in counts.items()}
    succeeded = by.get("succeeded", 0)
    failed = by.get("failed", 0) + by.get("cancelled", 0)
    finished = row.state == ApiBatchState.SUBMITTED and succeeded + failed >= row.requests
    status = _status(row, finished)
    created = _epoch(row.created_at)
    end = _epoch(last) if finished else None
    errors = None
    if row.error is not None:
        errors = {"object": "list", "data": [{"code": "invalid_file", "message": row.error,
                                              "param": "input_file_id", "line": None}]}  # fmt: skip
    return {
        "id": row.id, "object": "batch", "endpoint": row.endpoint, "errors": errors,
        "input_file_id": row.input_file_id, "completion_window": row.completion_window,
        "status": status,
        "output_file_id": OUT + row.id[6:] if finished and succeeded else None,
        "error_file_id": ERR + row.id[6:] if finished and failed else None,
        "created_at": created,
        "in_progress_at": created if status != "validating" else None,
        "expires_at": created + int(WINDOW.total_seconds()) if created else None,
        "finalizing_at": end, "completed_at": end if status == "completed" else None,
        "failed_at": _epoch(row.created_at) if status == "failed" else None,
        "expired_at": None,
        "cancelling_at": _epoch(row.cancelling_at),
        "cancelled_at": end if status == "cancelled" else None,
        "request_counts": {"total": row.requests, "completed": succeeded, "failed": failed},
        "metadata": row.meta,
        "tierfleet_batch_id": row.batch_id,
    }  # fmt: skip


def _filename(name: str | None) -> str:
    """The upload's name as kept: printable, at most 255 characters."""
    kept = "".join(c for c in (name or "") if c.isprintable())[:255]
    return kept or "batch.jsonl"


def _not_found(what: str, id_: str) -> ApiError:
    return ApiError(404, f"no {what} with id {id_!r}", code="not_found")
