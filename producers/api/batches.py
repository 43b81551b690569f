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
until every job is terminal, then `completed` (`cancelled` after a cancel).
"""

from __future__ import annotations

import datetime as dt
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, Field, StringConstraints
from sqlalchemy import cast, func, select
from sqlalchemy.dialects.postgresql import JSONB

from producers import bulk
from producers import openai_batch as oa
from producers.api.common import PRINTABLE, Api, ApiError, Caller, PathId, QueryId, documented
from producers.api.tokens import TokenInfo
from producers.batches import cancel as cancel_batch
from producers.jsonl import Input, RawLine
from tierfleet import constants as C
from tierfleet.constants import JobStatus
from tierfleet.errors import InvalidEnvelope
from tierfleet.models import ApiBatch, ApiFile, Attempt, Job

_Row = TypeVar("_Row", ApiFile, ApiBatch)
OUT, ERR = "file-out-", "file-err-"
# A job's custom_id, read in the database (the payload is text: the rest stays there).
_CUSTOM_ID = func.jsonb_extract_path_text(cast(Job.payload, JSONB), "metadata", "custom_id")
SHOWN_ERRORS = 10
WINDOW = dt.timedelta(hours=24)


MetaKey = Annotated[str, StringConstraints(max_length=64, pattern=PRINTABLE)]
MetaValue = Annotated[str, StringConstraints(max_length=512, pattern=r"^[^\x00]*$")]


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
        """Upload a batch input file. Every line is checked now: a file with a bad line
        is refused whole, each error with its line number, and nothing is kept; with
        `skip_invalid=true` the valid lines are kept and the file's `status_details`
        names the ones left out."""
        api = api_of(request)
        if purpose != "batch":
            raise ApiError(400, f"purpose must be 'batch', not {purpose!r}", code="invalid_purpose",
                        param="purpose")  # fmt: skip
        cap = api.settings.api_max_file_bytes
        content = file.file.read(cap + 1)
        if len(content) > cap:
            raise ApiError(413, f"the file is over its limit of {cap:,} bytes", code="too_large")
        content, lines, skipped = _check(content, api.settings.api_max_batch_lines, skip_invalid)
        row = ApiFile(
            id="file-" + secrets.token_hex(12), team=who.team, purpose=purpose,
            filename=_filename(file.filename), size=len(content), lines=lines,
            content=content,
        )  # fmt: skip
        with api.ledger.session() as s:
            s.add(row)
            s.flush()
            s.refresh(row)
            made = _file_object(row.id, row.size, row.created_at, row.filename, row.purpose)
        if skipped:
            made["status_details"] = _summary(skipped, len(skipped), kept=lines)
        return made

    @app.get("/v1/files/{file_id}", tags=["batches"], responses=documented(401, 403, 404, 429))
    def get_file(request: Request, file_id: PathId, who: Caller) -> dict[str, Any]:
        """A file object: an uploaded input, or a batch's output or error file."""
        api = api_of(request)
        if file_id.startswith((OUT, ERR)):
            batch = _own_batch(api, who, "batch_" + file_id[len(OUT) :])
            content = b"".join(_results(api, batch, errors_only=file_id.startswith(ERR)))
            return _file_object(file_id, len(content), batch.created_at,
                                f"{file_id}.jsonl", "batch_output")  # fmt: skip
        row = _own_file(api, who, file_id)
        return _file_object(row.id, row.size, row.created_at, row.filename, row.purpose)

    @app.get("/v1/files/{file_id}/content", tags=["batches"],
             responses=documented(401, 403, 404, 429))  # fmt: skip
    def file_content(request: Request, file_id: PathId, who: Caller) -> Response:
        """The file's bytes. A batch's output file has one line per request answered, in
        input order, as OpenAI writes them (`custom_id`, `response.body`, a
        `chat.completion`); its error file one per request that failed or was cancelled."""
        api = api_of(request)
        if file_id.startswith((OUT, ERR)):
            batch = _own_batch(api, who, "batch_" + file_id[len(OUT) :])
            content = b"".join(_results(api, batch, errors_only=file_id.startswith(ERR)))
        else:
            content = _own_file(api, who, file_id).content
        return Response(content, media_type="application/jsonl")

    @app.post("/v1/batches", tags=["batches"], responses=documented(400, 401, 403, 404, 429, 503))
    def create_batch(request: Request, body: CreateBatch, who: Caller) -> dict[str, Any]:
        """Run an uploaded file: each request becomes a job, routed like any other."""
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
        batch_id = "batch_" + secrets.token_hex(12)
        row = ApiBatch(
            id=batch_id, team=who.team, input_file_id=source.id, endpoint=body.endpoint,
            completion_window=body.completion_window, meta=body.metadata,
            batch_id="b-" + batch_id, requests=source.lines,
        )  # fmt: skip
        with api.ledger.session() as s:
            s.add(row)
        try:
            report = _submit(api, who, source, row.batch_id)
        except BaseException:
            with api.ledger.session() as s:
                s.delete(s.get_one(ApiBatch, batch_id))
            raise
        if not report.submitted:  # checked at upload; only a race with a config change
            with api.ledger.session() as s:
                s.delete(s.get_one(ApiBatch, batch_id))
            raise ApiError(400, _summary(report.errors, report.error_count), code="invalid_file",
                        param="input_file_id")  # fmt: skip
        return _batch_object(api, _get_batch(api, batch_id))

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
        data = [_batch_object(api, r) for r in rows[:limit]]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return {"object": "list", "data": data, "first_id": first, "last_id": last,
                "has_more": len(rows) > limit}  # fmt: skip

    @app.get("/v1/batches/{batch_id}", tags=["batches"], responses=documented(401, 403, 404, 429))
    def get_batch(request: Request, batch_id: PathId, who: Caller) -> dict[str, Any]:
        """A batch's status and request counts, in OpenAI's shape."""
        api = api_of(request)
        return _batch_object(api, _own_batch(api, who, batch_id))

    @app.post("/v1/batches/{batch_id}/cancel", tags=["batches"],
              responses=documented(401, 403, 404, 429))  # fmt: skip
    def cancel(request: Request, batch_id: PathId, who: Caller) -> dict[str, Any]:
        """Cancel: requests not yet started are cancelled, running ones finish; the batch
        is `cancelling` until then, and `cancelled` after."""
        api = api_of(request)
        row = _own_batch(api, who, batch_id)
        cancel_batch(api.ledger, row.batch_id)
        with api.ledger.session() as s:
            live = s.get_one(ApiBatch, batch_id)
            if live.cancelling_at is None:
                live.cancelling_at = dt.datetime.now(dt.UTC)
        return _batch_object(api, _get_batch(api, batch_id))


def _check(
    content: bytes, max_lines: int, skip_invalid: bool = False
) -> tuple[bytes, int, list[bulk.LineError]]:
    """Every line parses as a job and every custom_id is unique; else a 400 listing the
    first errors by line (with `skip_invalid`, the file without its bad lines). Returns
    the content to keep, its number of requests, and the lines left out."""
    problems: list[bulk.LineError] = []
    kept: list[bytes] = []
    seen: dict[str, int] = {}
    raw_lines = content.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    if len(raw_lines) > max_lines:
        raise ApiError(413, f"the file has {len(raw_lines):,} lines, over the limit of "
                       f"{max_lines:,}", code="too_many_lines")  # fmt: skip
    defaults = {"feature": "x", "latency": C.LATENCY_BATCH}  # the real ones come at submit
    for no, data in enumerate(raw_lines, start=1):
        if not data.strip():
            continue
        raw = RawLine(no, data, len(data), last=no == len(raw_lines), newline=True)
        try:
            spec = bulk.parse_line(raw, defaults, "check")
        except InvalidEnvelope as exc:
            problems.append(bulk.LineError(no, exc.field, str(exc)))
            continue
        custom_id = (spec.metadata or {}).get("custom_id")
        if custom_id is None:
            why = "not an OpenAI batch request line (custom_id, method, url, body)"
        elif custom_id in seen:
            why = f"custom_id {custom_id!r} is on line {seen[custom_id]} too"
        else:
            seen[custom_id] = no
            kept.append(data)
            continue
        problems.append(bulk.LineError(no, "custom_id", why))
    if problems and not (skip_invalid and kept):
        raise ApiError(400, _summary(problems, len(problems)), code="invalid_file", param="file")
    if not kept:
        raise ApiError(400, "the file has no requests", code="invalid_file", param="file")
    if problems:
        return b"\n".join(kept) + b"\n", len(kept), problems
    return content, len(kept), problems


def _summary(problems: list[bulk.LineError], total: int, kept: int | None = None) -> str:
    shown = "; ".join(str(p) for p in problems[:SHOWN_ERRORS])
    more = f" (and {total - SHOWN_ERRORS} more)" if total > SHOWN_ERRORS else ""
    outcome = "nothing submitted" if kept is None else f"left out, {kept} kept"
    return f"{total} invalid line{'s' if total != 1 else ''}, {outcome}: {shown}{more}"


def _submit(api: Api, who: TokenInfo, source: ApiFile, batch_id: str) -> bulk.Report:
    options = bulk.BatchOptions(
        feature=who.feature or "openai-batch", latency=C.LATENCY_BATCH, batch_id=batch_id,
        team=who.team,
    )  # fmt: skip
    with tempfile.NamedTemporaryFile(prefix="tierfleet-batch-", suffix=".jsonl") as spool:
        spool.write(source.content)
        spool.flush()
        return bulk.submit(
            Input(Path(spool.name), source.filename, gzip=False), options, api.ledger,
            api.client.celery, api.settings.queue_triage,
        )  # fmt: skip


def _own_file(api: Api, who: TokenInfo, file_id: str) -> ApiFile:
    return _owned(api, who, ApiFile, "file", file_id)


def _get_batch(api: Api, batch_id: str) -> ApiBatch:
    with api.ledger.session() as s:
        return s.get_one(ApiBatch, batch_id)


def _own_batch(api: Api, who: TokenInfo, batch_id: str) -> ApiBatch:
    return _owned(api, who, ApiBatch, "batch", batch_id)


def _owned(api: Api, who: TokenInfo, model: type[_Row], what: str, id_: str) -> _Row:
    """The row, when the caller's team owns it: 404 when there is none, 403 when it is
    another team's."""
    with api.ledger.session() as s:
        row = s.get(model, id_)
    if row is None:
        raise _not_found(what, id_)
    if row.team != who.team:
        raise ApiError(403, f"{what} {id_} is not a {what} of team {who.team!r}",
                       code="forbidden")  # fmt: skip
    return row


def _file_object(
    file_id: str, size: int, created: dt.datetime, filename: str, purpose: str
) -> dict[str, Any]:
    return {"id": file_id, "object": "file", "bytes": size, "created_at": _epoch(created),
            "filename": filename, "purpose": purpose, "status": "processed",
            "expires_at": None, "status_details": None}  # fmt: skip


def _epoch(moment: dt.datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def _batch_object(api: Api, row: ApiBatch) -> dict[str, Any]:
    in_batch = Job.batch_id == row.batch_id
    with api.ledger.session() as s:
        counts = dict(s.execute(select(Job.status, func.count()).where(in_batch)
                                .group_by(Job.status)).all())  # fmt: skip
        last = s.execute(select(func.max(Job.finished_at)).where(in_batch)).scalar_one()
    by = {JobStatus(k).value: n for k, n in counts.items()}
    succeeded = by.get("succeeded", 0)
    failed = by.get("failed", 0) + by.get("cancelled", 0)
    done = succeeded + failed
    finished = done >= row.requests
    if row.cancelling_at is not None:
        status = "cancelled" if finished else "cancelling"
    else:
        status = "completed" if finished else "in_progress"
    created = _epoch(row.created_at)
    end = _epoch(last) if finished else None
    return {
        "id": row.id, "object": "batch", "endpoint": row.endpoint, "errors": None,
        "input_file_id": row.input_file_id, "completion_window": row.completion_window,
        "status": status,
        "output_file_id": OUT + row.id[6:] if finished and succeeded else None,
        "error_file_id": ERR + row.id[6:] if finished and failed else None,
        "created_at": created, "in_progress_at": created,
        "expires_at": created + int(WINDOW.total_seconds()) if created else None,
        "finalizing_at": end, "completed_at": end if status == "completed" else None,
        "failed_at": None, "expired_at": None,
        "cancelling_at": _epoch(row.cancelling_at),
        "cancelled_at": end if status == "cancelled" else None,
        "request_counts": {"total": row.requests, "completed": succeeded, "failed": failed},
        "metadata": row.meta,
        "tierfleet_batch_id": row.batch_id,
    }  # fmt: skip


def _results(api: Api, row: ApiBatch, *, errors_only: bool) -> Iterator[bytes]:
    """The output (or error) file's lines, in input order, from the ledger."""
    in_batch = Job.batch_id == row.batch_id
    with api.ledger.session() as s:
        usage = {
            job_id: (int(i or 0), int(o or 0))
            for job_id, i, o in s.execute(
                select(Attempt.job_id, func.sum(Attempt.input_tokens),
                       func.sum(Attempt.output_tokens))
                .join(Job, Job.id == Attempt.job_id).where(in_batch).group_by(Attempt.job_id)
            )
        }  # fmt: skip
        models = dict(s.execute(
            select(Attempt.job_id, Attempt.model).join(Job, Job.id == Attempt.job_id)
            .where(in_batch, Attempt.outcome == "succeeded")
        ).all())  # fmt: skip
        jobs = s.execute(
            select(Job.id, Job.status, Job.result, Job.error, Job.tier, Job.cost_usd,
                   Job.finished_at, _CUSTOM_ID.label("custom_id"))
            .where(in_batch).order_by(Job.line)
        ).all()  # fmt: skip
    for job in jobs:
        status = JobStatus(job.status)
        custom_id = job.custom_id or job.id
        if status is JobStatus.SUCCEEDED and not errors_only:
            tokens_in, tokens_out = usage.get(job.id, (0, 0))
            yield oa.result_line(
                custom_id=custom_id, job_id=job.id, result=job.result,
                model=models.get(job.id, ""), input_tokens=tokens_in, output_tokens=tokens_out,
                finished_at=job.finished_at.timestamp() if job.finished_at else None,
                extra={"tier": job.tier, "cost_usd": str(job.cost_usd)},
            )  # fmt: skip
        elif status in (JobStatus.FAILED, JobStatus.CANCELLED) and errors_only:
            yield oa.error_line(custom_id=custom_id, job_id=job.id, status=status.value,
                                error=job.error)  # fmt: skip


def _filename(name: str | None) -> str:
    """The upload's name as kept: printable, at most 255 characters."""
    kept = "".join(c for c in (name or "") if c.isprintable())[:255]
    return kept or "batch.jsonl"


def _not_found(what: str, id_: str) -> ApiError:
    return ApiError(404, f"no {what} with id {id_!r}", code="not_found")
