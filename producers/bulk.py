"""Bulk submission: a JSONL file of envelopes becomes a batch of jobs.

Two streamed passes over the input, so memory stays flat in its size:

1. **Validate** every line (and compute the input's digest). Nothing is written unless
   every line is valid, or `skip_invalid` is set, in which case the rejects are returned
   with their reasons.
2. **Submit** the valid lines in chunks: each chunk is COPYed into a staging table and
   inserted into `jobs` (`ON CONFLICT DO NOTHING`: a job already there, from an earlier
   run or another batch, is left alone), the batch's resume marks move on in the same
   transaction, and then ONE message per chunk goes to the triage queue, which expands it
   by line range. No message per job crosses Redis at submit time.

The batch id derives from the input's content and the batch options, and each job's id
and idempotency key from the batch and its line (unless the line gives its own), so a
rerun of the same file, or a resume after Ctrl-C or a crash, writes and enqueues exactly
what is missing. A chunk whose message may not have been sent is sent again on resume;
triage ignores jobs that are no longer `queued`, so no job is triaged twice.
"""

from __future__ import annotations

import hashlib
import json
import queue as queue_
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
import psycopg
from celery import Celery
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import IntegrityError

from producers.jsonl import Input, RawLine, read_lines
from tierfleet import constants as C
from tierfleet.db import Ledger
from tierfleet.envelope import MAX_ENVELOPE_BYTES, JobSpec, parse_envelope
from tierfleet.errors import InvalidEnvelope
from tierfleet.models import Batch, Job

CHUNK_LINES = 2000
_IN_FLIGHT = 4  # parsed chunks waiting for the writer thread: bounds memory
MAX_KEPT_ERRORS = 10_000  # beyond this, errors are counted, not kept


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """Defaults for lines that do not say, and limits for the batch."""

    feature: str | None = None
    route: str | None = None
    latency: str = "batch"
    spend_cap_usd: Decimal | None = None
    batch_id: str | None = None
    max_line_bytes: int = MAX_ENVELOPE_BYTES

    def defaults(self) -> dict[str, Any]:
        out: dict[str, Any] = {"latency": self.latency}
        if self.feature:
            out["feature"] = self.feature
        if self.route:
            out["route"] = self.route
        return out


@dataclass(frozen=True, slots=True)
class LineError:
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", field {self.field!r}" if self.field else "")
        return f"{where}: {self.message}"


@dataclass
class Validation:
    batch_id: str
    lines: int = 0
    valid: int = 0
    blank: int = 0
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0
    invalid_lines: set[int] = field(default_factory=set)

    def reject(self, error: LineError) -> None:
        self.error_count += 1
        self.invalid_lines.add(error.line)
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(error)


@dataclass
class Submission:
    batch_id: str
    written: int = 0  # new jobs in the ledger
    existing: int = 0  # lines whose job already existed (a rerun, or another batch's key)
    chunks_enqueued: int = 0
    resumed_from_line: int = 0


def _parse(
    raw: RawLine, defaults: Mapping[str, Any], batch_id: str, validated: bool = False
) -> JobSpec:
    """One line to a job, or `InvalidEnvelope` naming the line and the field."""
    if raw.oversized:
        raise InvalidEnvelope(f"{raw.size:,} bytes is over the {MAX_ENVELOPE_BYTES:,}-byte limit")
    try:
        raw.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidEnvelope(
            f"not UTF-8: byte 0x{raw.data[exc.start]:02x} at column {exc.start + 1}"
        ) from None
    try:
        data = orjson.loads(raw.data)
    except orjson.JSONDecodeError as exc:
        if raw.last and not raw.newline:
            raise InvalidEnvelope(
                f"the last line is cut short (no newline at the end, and not JSON: {exc})"
            ) from None
        raise InvalidEnvelope(f"not JSON: {exc}") from None
    if isinstance(data, dict):
        data = {**defaults, **data}
        data.setdefault("idempotency_key", f"{batch_id}:{raw.no}")
        data.setdefault("id", f"{batch_id}.{raw.no}")
    return parse_envelope(data, validated=validated)


def batch_id_for(digest: str, options: BatchOptions) -> str:
    if options.batch_id:
        return options.batch_id
    key = json.dumps([digest, options.defaults(), str(options.spend_cap_usd)], sort_keys=True)
    return "b-" + hashlib.sha256(key.encode()).hexdigest()[:20]


def validate(
    source: Input, options: BatchOptions, progress: Callable[[int], None] = lambda n: None
) -> Validation:
    """Pass 1: check every line; nothing is written."""
    digest = hashlib.sha256()
    # The digest is only known at the end: validate with a provisional batch id (ids and
    # keys derived from it are not part of the checks) and fix the id afterwards.
    report = Validation(batch_id="pending")
    seen: dict[str, int] = {}
    defaults = options.defaults()
    for raw in read_lines(source, options.max_line_bytes, digest):
        report.lines += 1
        progress(raw.size + 1)
        if not raw.oversized and not raw.data.strip():
            report.blank += 1
            continue
        try:
            spec = _parse(raw, defaults, "pending")
        except InvalidEnvelope as exc:
            report.reject(LineError(raw.no, exc.field, exc.reason))
            continue
        for kind, value, generated in (
            ("id", spec.id, f"pending.{raw.no}"),
            ("idempotency_key", spec.idempotency_key, f"pending:{raw.no}"),
        ):
            if value is None or value == generated:
                continue
            first = seen.setdefault(f"{kind}\0{value}", raw.no)
            if first != raw.no:
                report.reject(
                    LineError(raw.no, kind, f"duplicate {kind} {value!r} (first on line {first})")
                )
                break
        else:
            report.valid += 1
    report.batch_id = batch_id_for(digest.hexdigest(), options)
    return report


_COLUMNS = (
    "id", "idempotency_key", "batch_id", "line", "feature", "status", "route", "latency",
    "payload", "cost_usd", "attempt_count", "attempt_floor",
)  # fmt: skip


def _rows(
    source: Input, options: BatchOptions, report: Validation, start_after: int
) -> Iterator[tuple[int, tuple[Any, ...]]]:
    defaults = options.defaults()
    for raw in read_lines(source, options.max_line_bytes):
        if raw.no <= start_after or raw.no in report.invalid_lines:
            continue
        if not raw.oversized and not raw.data.strip():
            continue
        spec = _parse(raw, defaults, report.batch_id, validated=True)  # pass 1 checked it
        yield raw.no, (
            spec.id, spec.idempotency_key, report.batch_id, raw.no, spec.feature,
            C.JobStatus.QUEUED.value, spec.route, spec.latency,
            orjson.dumps(spec.payload()).decode(), 0, 0, 0,
        )  # fmt: skip


def submit(
    source: Input,
    report: Validation,
    options: BatchOptions,
    ledger: Ledger,
    celery: Celery,
    queue: str,
    progress: Callable[[int], None] = lambda n: None,
) -> Submission:
    """Pass 2: write and enqueue the valid lines, resuming where an earlier run stopped.

    Parsing runs on this thread while a writer thread COPYs the previous chunks: Postgres
    works while Python parses. At most `_IN_FLIGHT` chunks wait between the two."""
    batch = _open_batch(ledger, source, report, options)
    out = Submission(report.batch_id, resumed_from_line=batch["written_through"])
    if batch["enqueued_through"] < batch["written_through"]:  # a crash after a write
        _enqueue(
            celery, queue, report.batch_id, batch["enqueued_through"] + 1, batch["written_through"]
        )
        out.chunks_enqueued += 1
        _mark(ledger, report.batch_id, enqueued_through=batch["written_through"])
    if batch["written_through"]:
        progress(_jobs_in_batch(ledger, report.batch_id))

    chunks: queue_.Queue[tuple[list[tuple[Any, ...]], int, int] | None] = queue_.Queue(_IN_FLIGHT)
    failure: list[BaseException] = []

    def write() -> None:
        while (item := chunks.get()) is not None:
            if failure:
                continue  # drain: the main thread stops at its next put
            rows, first, last = item
            try:
                _flush(ledger, celery, queue, report.batch_id, rows, first, last, out)
                progress(len(rows))
            except BaseException as exc:  # re-raised on the main thread
                failure.append(exc)

    writer = threading.Thread(target=write, name="tierfleet-submit-writer", daemon=True)
    writer.start()
    try:
        chunk: list[tuple[Any, ...]] = []
        first_line = batch["written_through"] + 1
        for no, row in _rows(source, options, report, batch["written_through"]):
            chunk.append(row)
            if len(chunk) >= CHUNK_LINES:
                chunks.put((chunk, first_line, no))
                chunk, first_line = [], no + 1
                if failure:
                    break
        if chunk and not failure:
            chunks.put((chunk, first_line, chunk[-1][3]))
    finally:
        chunks.put(None)
        writer.join()
    if failure:
        raise failure[0]
    return out


def _jobs_in_batch(ledger: Ledger, batch_id: str) -> int:
    with ledger.begin() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(Job).where(Job.batch_id == batch_id)
            ).scalar_one()
        )


def _open_batch(
    ledger: Ledger, source: Input, report: Validation, options: BatchOptions
) -> dict[str, int]:
    with ledger.session() as s:
        batch = s.get(Batch, report.batch_id)
        if batch is None:
            batch = Batch(
                id=report.batch_id,
                name=source.name[:200],
                feature=options.feature,
                options={k: v for k, v in options.defaults().items()},
                job_count=report.valid,
                total_lines=report.lines,
                rejected=report.error_count,
                spend_cap_usd=options.spend_cap_usd,
                written_through=0,
                enqueued_through=0,
            )
            s.add(batch)
            s.flush()
        return {"written_through": batch.written_through,
                "enqueued_through": batch.enqueued_through}  # fmt: skip


def _mark(ledger: Ledger, batch_id: str, **marks: int) -> None:
    with ledger.begin() as conn:
        conn.execute(update(Batch).where(Batch.id == batch_id).values(**marks))


def _flush(
    ledger: Ledger,
    celery: Celery,
    queue: str,
    batch_id: str,
    rows: list[tuple[Any, ...]],
    first_line: int,
    last_line: int,
    out: Submission,
) -> None:
    """One chunk: COPY, insert what is new, move the marks; then its one message."""
    with ledger.begin() as conn:
        inserted = _insert_rows(conn, rows)
        conn.execute(
            update(Batch)
            .where(Batch.id == batch_id)
            .values(written_through=last_line, enqueued_through=first_line - 1)
        )
    out.written += inserted
    out.existing += len(rows) - inserted
    _enqueue(celery, queue, batch_id, first_line, last_line)
    out.chunks_enqueued += 1
    _mark(ledger, batch_id, enqueued_through=last_line)


def _insert_rows(conn: Any, rows: list[tuple[Any, ...]]) -> int:
    """Insert the rows that are new; return how many. Postgres: COPY straight into
    `jobs`; if a row is already there (a resumed chunk, or a key another batch holds),
    COPY into a staging table instead and insert with ON CONFLICT DO NOTHING."""
    columns = ", ".join(_COLUMNS)
    if conn.dialect.name != "postgresql":  # SQLite (the demo): a multi-row insert
        placeholders = ", ".join(f":{c}" for c in _COLUMNS)
        result = conn.execute(
            text(f"INSERT OR IGNORE INTO jobs ({columns}) VALUES ({placeholders})"),
            [dict(zip(_COLUMNS, row, strict=True)) for row in rows],
        )
        return int(result.rowcount)
    driver = conn.connection.driver_connection
    try:
        with conn.begin_nested():
            _copy(driver, f"jobs ({columns})", rows)
        return len(rows)
    except IntegrityError:
        pass
    conn.execute(
        text(
            "CREATE TEMP TABLE IF NOT EXISTS tierfleet_stage "
            "(LIKE jobs INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
    )
    _copy(driver, f"tierfleet_stage ({columns})", rows)
    result = conn.execute(
        text(
            f"INSERT INTO jobs ({columns}) SELECT {columns} FROM tierfleet_stage "
            "ON CONFLICT DO NOTHING"
        )
    )
    return int(result.rowcount)


def _copy(driver: Any, target: str, rows: list[tuple[Any, ...]]) -> None:
    try:
        with driver.cursor() as cur, cur.copy(f"COPY {target} FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
    except psycopg.errors.UniqueViolation as exc:
        raise IntegrityError(f"COPY {target}", None, exc) from exc


def _enqueue(celery: Celery, queue: str, batch_id: str, first: int, last: int) -> None:
    celery.send_task(C.TASK_TRIAGE_RANGE, args=[batch_id, first, last], queue=queue)
