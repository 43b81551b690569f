"""The ledger: `batches`, `jobs`, `attempts` (SQLAlchemy 2 models).

Postgres is the system of record; Alembic in `migrations/` creates it and a test keeps
the migrations equal to these models. Money is `Numeric(18, 8)` USD, never float.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Text,
    TypeDecorator,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from tierfleet.constants import ApiBatchState, JobStatus, Outcome

JSONDoc = JSON().with_variant(JSONB(), "postgresql")


class JSONText(TypeDecorator[Any]):
    """JSON kept as plain text. The job's payload is a claim check, read whole by primary
    key and never searched: as `text` Postgres neither parses nor rebuilds it, which on a
    bulk COPY costs a sixth less than `json` and a half less than `jsonb`. Every payload
    is written by `orjson` from a validated envelope, so it is always well-formed."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else orjson.dumps(value).decode()

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return None if value is None else orjson.loads(value)


USD = Numeric(18, 8)

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _enum(cls: type[JobStatus] | type[Outcome], name: str) -> Enum:
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


def _now() -> Any:
    return DateTime(timezone=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    feature: Mapped[str | None] = mapped_column(String(100))
    options: Mapped[dict[str, Any]] = mapped_column(JSONDoc, default=dict)
    job_count: Mapped[int] = mapped_column(Integer, default=0)
    # Bulk submission: the input's digest (the batch id derives from it), how many
    # lines it had and rejected, and how far writing and enqueueing got (for resume).
    digest: Mapped[str | None] = mapped_column(String(64))
    total_lines: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    rejected: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    written_through: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    enqueued_through: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # A batch with a spend cap keeps its running spend here (workers add each attempt's
    # cost in the transaction that books it), and no new call starts once it reaches the
    # cap. Batches without a cap leave it at 0: their spend is the sum of their jobs'.
    spend_cap_usd: Mapped[Decimal | None] = mapped_column(USD)
    spent_usd: Mapped[Decimal] = mapped_column(USD, default=Decimal(0), server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(_now(), server_default=func.now())
    cancelled_at: Mapped[dt.datetime | None] = mapped_column(_now())

    __table_args__ = (Index(None, "created_at"),)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    # Not a foreign key: Postgres checks one row at a time, a quarter of a bulk COPY's
    # cost. The batch row is committed before any of its jobs and deleted after them.
    batch_id: Mapped[str | None] = mapped_column(String(64))
    line: Mapped[int | None] = mapped_column(Integer)  # its line in the batch's input
    feature: Mapped[str] = mapped_column(String(100))
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "job_status"))
    route: Mapped[str] = mapped_column(String(32))
    latency: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONText)
    tier: Mapped[str | None] = mapped_column(String(32))
    triage_score: Mapped[float | None] = mapped_column(Float)
    triage_reason: Mapped[str | None] = mapped_column(String(200))
    triage_version: Mapped[str | None] = mapped_column(String(64))
    result: Mapped[Any | None] = mapped_column(JSONDoc)
    error: Mapped[str | None] = mapped_column(Text)
    cost_usd: Mapped[Decimal] = mapped_column(USD, default=Decimal(0))
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts with seq <= attempt_floor belong to an earlier run (before a retry).
    attempt_floor: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(_now(), server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(
        _now(), server_default=func.now(), onupdate=func.now()
    )
    finished_at: Mapped[dt.datetime | None] = mapped_column(_now())
    # The lease of the attempt running now (`attempt_count` is its seq): a worker that
    # outlives `lease_until` has been replaced. `lost_leased_at` is set when a claim took
    # the job over from such a worker (the start of the lapsed lease).
    # Why a job that could run is waiting (a daily budget reached), until it runs.
    hold_reason: Mapped[str | None] = mapped_column(Text)
    # The team whose API token submitted it (`tierfleet serve`); None from the CLI and
    # the Python client. A token sees its own team's jobs only.
    team: Mapped[str | None] = mapped_column(String(100))
    leased_at: Mapped[dt.datetime | None] = mapped_column(_now())
    lease_until: Mapped[dt.datetime | None] = mapped_column(_now())
    lost_leased_at: Mapped[dt.datetime | None] = mapped_column(_now())

    attempts: Mapped[list[Attempt]] = relationship(
        back_populates="job", order_by="Attempt.seq", lazy="raise"
    )

    # Few indexes: every one is paid on each of a million COPYed rows. Batch views use
    # (batch_id, line); the reconciler finds stale unfinished jobs through the partial
    # index, which holds only jobs not yet terminal; reports by feature and time read
    # `attempts`, where the spend is.
    __table_args__ = (
        Index(None, "batch_id", "line"),
        Index(
            "ix_jobs_unfinished_updated_at",
            "updated_at",
            postgresql_where=text("status IN ('queued', 'triaged', 'running')"),
            sqlite_where=text("status IN ('queued', 'triaged', 'running')"),
        ),
    )


class Attempt(Base):
    __tablename__ = "attempts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    tier: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[Outcome] = mapped_column(_enum(Outcome, "attempt_outcome"))
    error: Mapped[str | None] = mapped_column(Text)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_read_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    latency_ms: Mapped[int] = mapped_column(Integer)
    cost_usd: Mapped[Decimal] = mapped_column(USD)
    mean_logprob: Mapped[float | None] = mapped_column(Float)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    feature: Mapped[str] = mapped_column(String(100))
    started_at: Mapped[dt.datetime] = mapped_column(_now())
    created_at: Mapped[dt.datetime] = mapped_column(_now(), server_default=func.now())
    # Run in a provider's message batch (priced at its batch discount): which one.
    provider_batch_id: Mapped[str | None] = mapped_column(String(64))

    job: Mapped[Job] = relationship(back_populates="attempts", lazy="raise")

    __table_args__ = (
        Index(None, "job_id", "seq", unique=True),
        Index(None, "created_at"),
        Index(None, "feature", "created_at"),
        Index(None, "tier", "created_at"),
    )


class DeadLetter(Base):
    """A message that could not be processed: undecodable, unknown, or failing every
    time. Kept with its error, traceback and (the start of) its body, never retried."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str | None] = mapped_column(String(64))
    task: Mapped[str | None] = mapped_column(String(100))
    queue: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(
        String(32)
    )  # undecodable | unknown_task | errors | worker_lost
    tries: Mapped[int] = mapped_column(Integer, default=1)
    error: Mapped[str] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    body: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(_now(), server_default=func.now())

    __table_args__ = (Index(None, "created_at"), Index(None, "job_id"))


class Budget(Base):
    """A daily spend cap: `frontier` (every frontier attempt) or `feature:NAME` (every
    attempt of the feature). Once today's spend reaches it, new frontier attempts in the
    scope wait for the next UTC day or a raised cap."""

    __tablename__ = "budgets"

    scope: Mapped[str] = mapped_column(String(120), primary_key=True)
    daily_cap_usd: Mapped[Decimal] = mapped_column(USD)
    updated_at: Mapped[dt.datetime] = mapped_column(
        _now(), server_default=func.now(), onupdate=func.now()
    )


class BudgetSpend(Base):
    """What a capped scope has spent on one UTC day; workers add each attempt's cost in
    the transaction that books it."""

    __tablename__ = "budget_spend"

    scope: Mapped[str] = mapped_column(String(120), primary_key=True)
    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    spent_usd: Mapped[Decimal] = mapped_column(USD)


class ProviderBatch(Base):
    """One Message Batches batch at the provider. `status`: `submitting` (its requests
    are chosen, the create call may not have answered yet), then the provider's
    `in_progress` / `canceling` / `ended`, then `ingested` once every result is booked.
    `locked_until` is the lease of whoever submits or ingests it now."""

    __tablename__ = "provider_batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tier: Mapped[str] = mapped_column(String(32))  # the rung whose requests it carries
    provider: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(200))
    provider_batch_id: Mapped[str | None] = mapped_column(String(100), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    requests: Mapped[int] = mapped_column(Integer)
    request_bytes: Mapped[int] = mapped_column(BigInteger)
    succeeded: Mapped[int] = mapped_column(Integer, default=0)
    errored: Mapped[int] = mapped_column(Integer, default=0)
    expired: Mapped[int] = mapped_column(Integer, default=0)
    canceled: Mapped[int] = mapped_column(Integer, default=0)
    ingested: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    locked_until: Mapped[dt.datetime | None] = mapped_column(_now())
    created_at: Mapped[dt.datetime] = mapped_column(_now(), server_default=func.now())
    submitted_at: Mapped[dt.datetime | None] = mapped_column(_now())
    ended_at: Mapped[dt.datetime | None] = mapped_column(_now())
    ingested_at: Mapped[dt.datetime | None] = mapped_column(_now())

    __table_args__ = (Index(None, "status"),)


class BatchRequest(Base):
    """A batch-mode attempt on a tier with `batch`, collected durably until it goes out in
    a provider batch of its tier. Its id is the attempt's id, which is the request's
    `custom_id`."""

    __tablename__ = "batch_requests"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(Integer)
    tier: Mapped[str] = mapped_column(String(32))  # the rung it was collected on
    batch_id: Mapped[str | None] = mapped_column(String(64))  # its ProviderBatch, once chosen
    collected_at: Mapped[dt.datetime] = mapped_column(_now())

    __table_args__ = (Index(None, "batch_id", "tier", "collected_at"),)


class ApiToken(Base):
    """A bearer token of the HTTP API, mapped to a team and a default feature. Only its
    SHA-256 is kept (a token is 32 random bytes: a slow hash adds nothing); `prefix`, its
    first characters, tells tokens apart in `tierfleet tokens list`."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    team: Mapped[str] = mapped_column(String(100))
    feature: Mapped[str | None] = mapped_column(String(100))  # for envelopes without one
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    rate_limit: Mapped[str | None] = mapped_column(String(32))  # "100/second"; None: default
    created_at: Mapped[dt.datetime] = mapped_column(_now(), server_default=func.now())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(_now())


class ApiFile(Base):
    """A file uploaded to the HTTP API (`POST /v1/files`, purpose `batch`): an OpenAI
    batch input, kept whole (its size is capped) until a batch reads it."""

    __tablename__ = "api_files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team: Mapped[str] = mapped_column(String(100))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column("bytes", BigInteger)
    lines: Mapped[int] = mapped_column(Integer)
    # read only where the bytes are needed (a metadata read does not load 100 MB)
    content: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[dt.datetime] = mapped_column(_now(), server_default=func.now())


class ApiBatch(Base):
    """An OpenAI-style batch (`POST /v1/batches`): its input file, and the tierfleet
    batch (`batches.id`) its requests became jobs of. Its status and counts are read
    from those jobs once `state` is `submitted`; a batch left `submitting` by a server
    that died is submitted again by the next request that reads it. `idempotency_key`
    is the team-scoped key of the create; the sizes of the output and error files are
    kept for the jobs' state as of `files_as_of` (their last `finished_at`)."""

    __tablename__ = "api_batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team: Mapped[str] = mapped_column(String(100))
    input_file_id: Mapped[str] = mapped_column(String(40))
    endpoint: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    meta: Mapped[Any | None] = mapped_column("metadata", JSONDoc)
    batch_id: Mapped[str] = mapped_column(String(64))
    requests: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(_now(), server_default=func.now())
    cancelling_at: Mapped[dt.datetime | None] = mapped_column(_now())
    idempotency_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    state: Mapped[str] = mapped_column(String(16), server_default=ApiBatchState.SUBMITTED.value)
    feature: Mapped[str | None] = mapped_column(String(100))  # its jobs' default feature
    error: Mapped[str | None] = mapped_column(Text)  # why it failed
    output_bytes: Mapped[int | None] = mapped_column(BigInteger)
    error_bytes: Mapped[int | None] = mapped_column(BigInteger)
    files_as_of: Mapped[dt.datetime | None] = mapped_column(_now())

    __table_args__ = (Index(None, "team", "created_at"),)
