"""The files of the HTTP API's batches: an upload checked by the rules its batch is
submitted by (so a file accepted here is never refused at `POST /v1/batches`), and a
batch's output and error files, rendered from the ledger as they are sent, row by row
from a server-side cursor, never whole. Their sizes are counted the same way and kept
once the batch has finished."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, true, update

from producers import bulk
from producers import openai_batch as oa
from producers.api.common import ApiError
from producers.jsonl import Input, read_lines
from tierfleet import constants as C
from tierfleet.constants import JobStatus, Outcome
from tierfleet.db import Ledger, utc
from tierfleet.errors import InvalidEnvelope
from tierfleet.models import ApiBatch, ApiFile, Attempt, Job

SHOWN_ERRORS = 10
ROWS_PER_FETCH = 500  # rendered lines held at once
CONTENT_PIECE = 1 << 20  # bytes of an uploaded file sent at once
SEND_BYTES = 1 << 16  # result lines are sent in pieces of about this size
_CHECK_BATCH = "check"  # the batch id lines are parsed under at upload (ids are made later)
_ERRORS = (JobStatus.FAILED, JobStatus.CANCELLED)


def options_for(feature: str | None, batch_id: str | None = None, team: str | None = None,
                tiers: tuple[str, ...] = C.TIER_LADDER) -> bulk.BatchOptions:  # fmt: skip
    """The bulk options a batch's requests are submitted with (and checked by)."""
    return bulk.BatchOptions(feature=feature or "openai-batch", latency=C.LATENCY_BATCH,
                             batch_id=batch_id, team=team, tiers=tiers)  # fmt: skip


@dataclass
class Checked:
    content: bytes  # what is kept: the file, or its valid lines with `skip_invalid`
    requests: int
    skipped: list[bulk.LineError]


def check(content: bytes, options: bulk.BatchOptions, max_requests: int,
          skip_invalid: bool = False) -> Checked:  # fmt: skip
    """Every line as the batch's submission reads it (the same reader, size limit,
    parser and uniqueness rules; blank lines are not requests), and every custom_id a
    unique string; else a 400 listing the first errors by line."""
    problems: list[bulk.LineError] = []
    kept: list[bytes] = []
    seen: dict[tuple[str, str], int] = {}
    custom_ids: dict[str, int] = {}
    defaults = options.defaults()
    for raw in read_lines(Input.of_bytes(content, "upload"), options.max_line_bytes):
        if not raw.oversized and not raw.data.strip():
            continue
        if len(kept) + len(problems) >= max_requests:
            raise ApiError(413, f"the file's requests (lines not blank) are over the limit of "
                           f"{max_requests:,}", code="too_many_lines")  # fmt: skip
        try:
            spec = bulk.parse_line(raw, defaults, _CHECK_BATCH, options.max_line_bytes,
                                   options.team, options.tiers)  # fmt: skip
            bulk.check_unique(spec, raw.no, _CHECK_BATCH, seen)
            _check_custom_id((spec.metadata or {}).get("custom_id"), raw.no, custom_ids)
        except InvalidEnvelope as exc:
            problems.append(bulk.LineError(raw.no, exc.field, exc.reason))
            continue
        kept.append(raw.data)
    if problems and not (skip_invalid and kept):
        raise ApiError(400, summary(problems, len(problems)), code="invalid_file", param="file")
    if not kept:
        raise ApiError(400, "the file has no requests", code="invalid_file", param="file")
    if problems:
        content = b"\n".join(kept) + b"\n"
    return Checked(content, len(kept), problems)


def _check_custom_id(custom_id: Any, line: int, seen: dict[str, int]) -> None:
    if custom_id is None:
        raise InvalidEnvelope("not an OpenAI batch request line (custom_id, method, url, body)",
                              field="custom_id")  # fmt: skip
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= oa.MAX_CUSTOM_ID:
        raise InvalidEnvelope(f"custom_id must be a string of 1 to {oa.MAX_CUSTOM_ID} "
                              f"characters, not {type(custom_id).__name__}",
                              field="custom_id")  # fmt: skip
    first = seen.setdefault(custom_id, line)
    if first != line:
        raise InvalidEnvelope(f"custom_id {custom_id!r} is on line {first} too", field="custom_id")


def summary(problems: list[bulk.LineError], total: int, kept: int | None = None) -> str:
    shown = "; ".join(str(p) for p in problems[:SHOWN_ERRORS])
    more = f" (and {total - SHOWN_ERRORS} more)" if total > SHOWN_ERRORS else ""
    outcome = "nothing submitted" if kept is None else f"left out, {kept} kept"
    return f"{total} invalid line{'s' if total != 1 else ''}, {outcome}: {shown}{more}"


def upload_content(ledger: Ledger, row: ApiFile) -> Iterator[bytes]:
    """An uploaded file's bytes, a piece at a time."""
    for start in range(1, row.size + 1, CONTENT_PIECE):
        piece = func.substring(ApiFile.content, start, CONTENT_PIECE)
        with ledger.session() as s:
            yield s.execute(select(piece).where(ApiFile.id == row.id)).scalar_one()


def results(ledger: Ledger, row: ApiBatch, *, errors_only: bool) -> Iterator[bytes]:
    """The output (or error) file's lines, in input order, some 64 KB at a time."""
    piece: list[bytes] = []
    held = 0
    for _, line in _rendered(ledger, row, _ERRORS if errors_only else (JobStatus.SUCCEEDED,)):
        piece.append(line)
        held += len(line)
        if held >= SEND_BYTES:
            yield b"".join(piece)
            piece, held = [], 0
    if piece:
        yield b"".join(piece)


def size(ledger: Ledger, row: ApiBatch, *, errors_only: bool) -> int:
    """The file's length in bytes: counted as it would be sent, and kept once every
    job has finished (until one finishes again, after a retry)."""
    in_batch = Job.batch_id == row.batch_id
    with ledger.session() as s:
        done, last = s.execute(
            select(func.count(), func.max(Job.finished_at))
            .where(in_batch, Job.status.in_(tuple(C.TERMINAL_STATUSES)))
        ).one()  # fmt: skip
    finished = last is not None and done >= row.requests
    if last is not None and finished and row.files_as_of and utc(row.files_as_of) == utc(last):
        kept = row.error_bytes if errors_only else row.output_bytes
        if kept is not None:
            return kept
    sizes = {True: 0, False: 0}
    for status, line in _rendered(ledger, row, tuple(C.TERMINAL_STATUSES)):
        sizes[status in _ERRORS] += len(line)
    if finished:
        with ledger.begin() as conn:
            conn.execute(update(ApiBatch).where(ApiBatch.id == row.id).values(
                output_bytes=sizes[False], error_bytes=sizes[True], files_as_of=last))  # fmt: skip
    return sizes[errors_only]


def _rendered(
    ledger: Ledger, row: ApiBatch, statuses: tuple[JobStatus, ...]
) -> Iterator[tuple[JobStatus, bytes]]:
    """(status, line) of the batch's jobs in those statuses, in input order. The
    custom_id is read from the payload in Python: a NUL a prompt holds (`\\u0000`) is
    text Postgres's JSON functions refuse."""
    used = (  # per job, through the attempts' (job_id, seq) index
        select(func.sum(Attempt.input_tokens).label("tokens_in"),
               func.sum(Attempt.output_tokens).label("tokens_out"),
               func.max(Attempt.model).filter(Attempt.outcome == Outcome.SUCCEEDED)
               .label("model"))
        .where(Attempt.job_id == Job.id).correlate(Job).lateral()
    )  # fmt: skip
    query = (
        select(Job.id, Job.status, Job.result, Job.error, Job.tier, Job.cost_usd,
               Job.finished_at, Job.payload, used.c.tokens_in, used.c.tokens_out, used.c.model)
        .outerjoin(used, true())
        .where(Job.batch_id == row.batch_id, Job.status.in_(statuses))
        .order_by(Job.line)
    )  # fmt: skip
    with ledger.engine.connect() as conn:
        for job in conn.execution_options(yield_per=ROWS_PER_FETCH).execute(query):
            status = JobStatus(job.status)
            yield status, _line(job, status)


def _line(job: Any, status: JobStatus) -> bytes:
    custom_id = (job.payload.get("metadata") or {}).get("custom_id") or job.id
    if status is not JobStatus.SUCCEEDED:
        return oa.error_line(custom_id=custom_id, job_id=job.id, status=status.value,
                             error=job.error)  # fmt: skip
    return oa.result_line(
        custom_id=custom_id, job_id=job.id, result=job.result, model=job.model or "",
        input_tokens=int(job.tokens_in or 0), output_tokens=int(job.tokens_out or 0),
        finished_at=job.finished_at.timestamp() if job.finished_at else None,
        extra={"tier": job.tier, "cost_usd": str(job.cost_usd)},
    )  # fmt: skip
