"""Bulk submission: a JSONL file of envelopes becomes a batch of jobs.

One streamed pass over the input, so memory stays flat in its size:

- every line is parsed and checked; the valid ones are written to Postgres in chunks
  (COPY, by writer threads on their own connections, while parsing goes on), each chunk
  committing with the batch's resume mark;
- nothing is **enqueued** until every line has been checked. If a line is invalid (and
  `skip_invalid` is off) the rows written are deleted and the batch with them: nothing
  half-applies. Otherwise ONE message per chunk goes to the triage queue, which expands it
  by line range: no message per job crosses Redis at submit time.

The batch id derives from the input's bytes and the batch options, and each job's id and
idempotency key from the batch and its line (unless the line gives its own), so a rerun
of the same file, or a resume after Ctrl-C or a crash, writes and enqueues exactly what
is missing. A chunk message that may have been sent before a crash is sent again; triage
ignores jobs that are no longer `queued`, so no job is triaged twice.
"""

from __future__ import annotations

import hashlib
import json
import queue as queue_
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
from celery import Celery
from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql

from producers import openai_batch, teams
from producers.copy import copy_rows, copy_text
from producers.jsonl import Input, RawLine, read_lines
from tierfleet import constants as C
from tierfleet import envelope_fast
from tierfleet.db import Ledger
from tierfleet.envelope import MAX_ENVELOPE_BYTES, JobSpec, parse_envelope
from tierfleet.errors import InvalidEnvelope
from tierfleet.models import Batch, Job

CHUNK_LINES = 2000
_QUEUED = C.JobStatus.QUEUED.value
WRITERS = 3  # Postgres connections writing at once: COPY is server-bound (measured best here)
_IN_FLIGHT = 4  # parsed chunks waiting for a writer: bounds memory
_PROGRESS_BYTES = 1 << 18
MAX_KEPT_ERRORS = 10_000  # beyond this, errors are counted (and still written to rejects)


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """Defaults for lines that do not say, and limits for the batch."""

    feature: str | None = None
    route: str | None = None
    latency: str = "batch"
    spend_cap_usd: Decimal | None = None
    batch_id: str | None = None
    max_line_bytes: int = MAX_ENVELOPE_BYTES
    skip_invalid: bool = False
    team: str | None = None  # whose API token submitted the batch
    tiers: tuple[str, ...] = C.TIER_LADDER  # the ladder a `route` must name a tier of

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
    text: str = ""  # the start of the rejected line, for the rejects file

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", field {self.field!r}" if self.field else "")
        return f"{where}: {self.message}"

    def record(self) -> dict[str, Any]:
        return {"line": self.line, "field": self.field, "error": self.message, "input": self.text}


@dataclass
class Report:
    """What a submission did. `submitted` is false when invalid lines stopped it."""

    batch_id: str
    lines: int = 0
    valid: int = 0
    blank: int = 0
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0
    written: int = 0  # new jobs in the ledger
    existing: int = 0  # lines whose job was already there (a resume, another batch's key)
    chunks_enqueued: int = 0
    resumed_from_line: int = 0
    submitted: bool = False
    elapsed_s: float = 0.0  # from the first byte read to the last message sent

    def reject(self, error: LineError) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(error)

    def summary(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id if self.submitted else None,
            "lines": self.lines,
            "valid": self.valid,
            "invalid": self.error_count,
            "blank": self.blank,
            "written": self.written,
            "already_there": self.existing,
            "chunks_enqueued": self.chunks_enqueued,
            "resumed_from_line": self.resumed_from_line,
            "elapsed_s": round(self.elapsed_s, 3),
        }


def digest_of(source: Input) -> str:
    """SHA-256 of the input's bytes (as stored: a .gz is hashed compressed)."""
    digest = hashlib.sha256()
    with source.raw() as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def batch_id_for(digest: str, options: BatchOptions) -> str:
    if options.batch_id:
        return options.batch_id
    key = json.dumps(
        [digest, options.defaults(), str(options.spend_cap_usd), options.skip_invalid],
        sort_keys=True,
    )
    return "b-" + hashlib.sha256(key.encode()).hexdigest()[:20]


def parse_line(
    raw: RawLine,
    defaults: Mapping[str, Any],
    batch_id: str,
    limit: int = MAX_ENVELOPE_BYTES,
    team: str | None = None,
    tiers: tuple[str, ...] = C.TIER_LADDER,
) -> JobSpec:
    """One line to a job, or `InvalidEnvelope` naming the field. For a `team`'s batch,
    the job's feature, and the id and idempotency key the line gives, are put in the
    team's own space (`producers.teams`)."""
    job_id, key = f"{batch_id}.{raw.no}", f"{batch_id}:{raw.no}"
    spec = _parse_line(raw, defaults, job_id, key, limit, tiers)
    if team is None:
        return spec
    return teams.scope_spec(
        team, spec, own_id=spec.id != job_id, own_key=spec.idempotency_key != key
    )


def _parse_line(
    raw: RawLine,
    defaults: Mapping[str, Any],
    job_id: str,
    key: str,
    limit: int,
    tiers: tuple[str, ...],
) -> JobSpec:
    """The typed decoder takes the common case; anything it declines goes through the
    reference parser."""
    if raw.oversized:
        raise InvalidEnvelope(f"{raw.size:,} bytes is over the {limit:,}-byte limit")
    try:
        return envelope_fast.decode(raw.data, defaults, job_id, key, tiers)
    except envelope_fast.NotFast:
        pass
    try:
        data = orjson.loads(raw.data)
    except orjson.JSONDecodeError as exc:
        try:
            raw.data.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise InvalidEnvelope(
                f"not UTF-8: byte 0x{raw.data[bad.start]:02x} at column {bad.start + 1}"
            ) from None
        if raw.last and not raw.newline:
            raise InvalidEnvelope(
                f"the last line is cut short (no newline at the end, and not JSON: {exc})"
            ) from None
        raise InvalidEnvelope(f"not JSON: {exc}") from None
    if isinstance(data, dict):
        if openai_batch.is_request(data):  # OpenAI's batch format: the same job
            data = openai_batch.to_envelope(data)
        data = {**defaults, **data}
        data.setdefault("idempotency_key", key)
        data.setdefault("id", job_id)
    return parse_envelope(data, tiers=tiers)


def _row(spec: JobSpec, batch_id: str, line: int, team: str | None = None) -> bytes:
    """The job as one line of COPY text, in `producers.copy.COLUMNS` order."""
    # Every field from the input is escaped (a schema pattern's `$` lets a final newline
    # through in Python's regex dialect); the rest are ours, or an enum (latency).
    payload = copy_text(orjson.dumps(spec.payload()).decode())
    fields = (
        copy_text(spec.id), copy_text(spec.idempotency_key), batch_id, str(line),
        copy_text(spec.feature), _QUEUED, copy_text(spec.route), spec.latency, payload,
        "0", "0", "0", copy_text(team),
    )  # fmt: skip
    return ("\t".join(fields) + "\n").encode()


class _Writers:
    """Threads that COPY chunks on their own connections, committing each with the
    batch's `written_through` mark: the end of the longest run of committed chunks."""

    def __init__(self, ledger: Ledger, batch_id: str, start_after: int, n: int) -> None:
        self.ledger, self.batch_id = ledger, batch_id
        self.queue: queue_.Queue[tuple[list[bytes], int, int] | None] = queue_.Queue(_IN_FLIGHT)
        self.failure: list[BaseException] = []
        self.lock = threading.Lock()
        self.mark = start_after
        self.done: dict[int, int] = {}  # first line -> last line, committed beyond the mark
        self.written = self.existing = 0
        self.conflicts: list[tuple[int, str]] = []  # (line, id): taken by another job
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]
        for thread in self.threads:
            thread.start()

    def put(self, rows: list[bytes], first: int, last: int) -> None:
        self.queue.put((rows, first, last))

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        if self.failure:
            raise self.failure[0]

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.failure:
                continue  # drain; the error is raised by close()
            try:
                self._write(*item)
            except BaseException as exc:
                self.failure.append(exc)

    def _write(self, rows: list[bytes], first: int, last: int) -> None:
        with self.ledger.begin() as conn:
            inserted, conflicts = copy_rows(conn, rows, self.batch_id)
        # The mark moves only over chunks that have committed: a chunk that fails never
        # lets the mark pass it, so a resume writes it again.
        with self.lock:
            self.done[first] = last
            mark = self.mark
            while mark + 1 in self.done:
                mark = self.done.pop(mark + 1)
            self.mark = mark
            self.written += inserted
            self.existing += len(rows) - inserted - len(conflicts)
            self.conflicts.extend(conflicts)
        with self.ledger.begin() as conn:
            conn.execute(
                update(Batch)
                .where(Batch.id == self.batch_id, Batch.written_through < mark)
                .values(written_through=mark)
            )


def submit(
    source: Input,
    options: BatchOptions,
    ledger: Ledger,
    celery: Celery,
    queue: str,
    *,
    on_reject: Callable[[LineError], None] = lambda e: None,
    progress: Callable[[int], None] = lambda n: None,
) -> Report:
    """Check every line, write the valid ones, and enqueue them once all are checked."""
    started = time.perf_counter()
    digest = digest_of(source)
    report = Report(batch_id_for(digest, options))
    batch = _open_batch(ledger, source, report.batch_id, digest, options)
    report.resumed_from_line = batch.written_through
    writers = _Writers(ledger, report.batch_id, batch.written_through, WRITERS)
    try:
        try:
            _read_and_write(source, options, report, batch.written_through, writers,
                            on_reject, progress)  # fmt: skip
        finally:
            writers.close()
    except (OSError, EOFError, zlib.error) as exc:  # unreadable input: nothing is kept
        _withdraw(ledger, report.batch_id)
        raise InvalidEnvelope(
            f"{source.name}: cannot read past line {report.lines:,}: {exc}"
        ) from None
    report.written, report.existing = writers.written, writers.existing
    for line, job_id in sorted(writers.conflicts):
        error = LineError(line, "id", f"id or idempotency key of {job_id!r} belongs to another job")
        report.reject(error)
        on_reject(error)
    if report.error_count and not options.skip_invalid:
        _withdraw(ledger, report.batch_id)
        return report
    _finish_batch(ledger, report)
    report.chunks_enqueued = _enqueue_pending(ledger, celery, queue, report.batch_id)
    report.submitted = True
    report.elapsed_s = time.perf_counter() - started
    return report


def _read_and_write(
    source: Input,
    options: BatchOptions,
    report: Report,
    start_after: int,
    writers: _Writers,
    on_reject: Callable[[LineError], None],
    progress: Callable[[int], None],
) -> None:
    defaults = options.defaults()
    seen: dict[tuple[str, str], int] = {}
    chunk: list[bytes] = []
    first = start_after + 1
    writing = True
    unreported = 0  # bytes read since the last progress call (one call per line costs 5%)
    for raw in read_lines(source, options.max_line_bytes):
        report.lines += 1
        unreported += raw.size + 1
        if unreported >= _PROGRESS_BYTES:
            progress(unreported)
            unreported = 0
        if not raw.oversized and not raw.data.strip():
            report.blank += 1
            continue
        try:
            spec = parse_line(
                raw, defaults, report.batch_id, options.max_line_bytes, options.team, options.tiers
            )
            check_unique(spec, raw.no, report.batch_id, seen)
        except InvalidEnvelope as exc:
            text = raw.data[:2000].decode("utf-8", errors="replace")
            error = LineError(raw.no, exc.field, exc.reason, text)
            report.reject(error)
            on_reject(error)
            writing = writing and options.skip_invalid  # no use writing what is withdrawn
            continue
        report.valid += 1
        if not writing or raw.no <= start_after:
            continue
        chunk.append(_row(spec, report.batch_id, raw.no, options.team))
        if len(chunk) >= CHUNK_LINES:
            writers.put(chunk, first, raw.no)
            chunk, first = [], raw.no + 1
            if writers.failure:
                return
    progress(unreported)
    if chunk and writing:
        writers.put(chunk, first, report.lines)


def check_unique(spec: JobSpec, line: int, batch_id: str, seen: dict[tuple[str, str], int]) -> None:
    """An `id` or `idempotency_key` a line gives must not repeat within the file."""
    for kind, value, generated in (
        ("id", spec.id, f"{batch_id}.{line}"),
        ("idempotency_key", spec.idempotency_key, f"{batch_id}:{line}"),
    ):
        if value is None or value == generated:
            continue
        first = seen.setdefault((kind, value), line)
        if first != line:
            raise InvalidEnvelope(f"duplicate {kind} {value!r} (first on line {first})", field=kind)


def _open_batch(
    ledger: Ledger, source: Input, batch_id: str, digest: str, options: BatchOptions
) -> Batch:
    """The batch to write into: new, or the one an earlier run of the same input began.
    (`ON CONFLICT DO NOTHING`: two submits of one file at once share the batch.)"""
    with ledger.begin() as conn:
        conn.execute(
            postgresql.insert(Batch)
            .values(
                id=batch_id,
                digest=digest,
                name=source.name[:200],
                feature=_batch_feature(options),
                options=options.defaults(),
                job_count=0,
                spend_cap_usd=options.spend_cap_usd,
                written_through=0,
                enqueued_through=0,
            )
            .on_conflict_do_nothing()
        )
    with ledger.session() as s:
        batch = s.get_one(Batch, batch_id)
        s.expunge(batch)
    if batch.digest not in (None, digest):
        raise InvalidEnvelope(
            f"batch {batch_id!r} was submitted from other content; "
            "give a new --batch-id (or none: one is derived from the content)"
        )
    if batch.cancelled_at is not None:
        raise InvalidEnvelope(f"batch {batch_id!r} was cancelled; nothing more is added")
    return batch


def _batch_feature(options: BatchOptions) -> str | None:
    if options.feature is None or options.team is None:
        return options.feature
    return teams.team_feature(options.team, options.feature)


def _withdraw(ledger: Ledger, batch_id: str) -> None:
    """Invalid lines and no --skip-invalid: remove what this batch wrote (nothing of it
    was enqueued), so that nothing is half-applied."""
    with ledger.begin() as conn:
        enqueued = conn.execute(
            select(Batch.enqueued_through).where(Batch.id == batch_id)
        ).scalar_one()
        if enqueued:  # an earlier run, with --skip-invalid, enqueued part of it: keep that
            return
        conn.execute(delete(Job).where(Job.batch_id == batch_id))
        conn.execute(delete(Batch).where(Batch.id == batch_id))


def _finish_batch(ledger: Ledger, report: Report) -> None:
    with ledger.begin() as conn:
        jobs = select(func.count()).where(Job.batch_id == report.batch_id).scalar_subquery()
        conn.execute(
            update(Batch)
            .where(Batch.id == report.batch_id)
            .values(job_count=jobs, total_lines=report.lines, rejected=report.error_count)
        )


def _enqueue_pending(ledger: Ledger, celery: Celery, queue: str, batch_id: str) -> int:
    """One triage message per chunk written but not yet enqueued; then move the mark."""
    with ledger.begin() as conn:
        row = conn.execute(
            select(Batch.enqueued_through, Batch.written_through).where(Batch.id == batch_id)
        ).one()
    sent = 0
    for first, last in spans(row.enqueued_through + 1, row.written_through, CHUNK_LINES):
        celery.send_task(C.TASK_TRIAGE_RANGE, args=[batch_id, first, last], queue=queue)
        sent += 1
    with ledger.begin() as conn:
        conn.execute(
            update(Batch).where(Batch.id == batch_id).values(enqueued_through=row.written_through)
        )
    return sent


def spans(first: int, last: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(first, last + 1, size):
        yield start, min(start + size - 1, last)


__all__ = ["BatchOptions", "LineError", "Report", "submit"]
