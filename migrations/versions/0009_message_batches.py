"""Message Batches: collected batch-mode requests, provider batches, batch-priced attempts

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 21:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

OUTCOMES = (
    "succeeded", "invalid", "low_confidence", "timeout", "error", "failed", "abandoned",
)  # fmt: skip


def _outcomes(allowed: tuple[str, ...]) -> None:
    values = ", ".join(f"'{v}'" for v in allowed)
    with op.batch_alter_table("attempts") as batch:
        batch.drop_constraint(op.f("ck_attempts_attempt_outcome"), type_="check")
        batch.create_check_constraint("attempt_outcome", sa.text(f"outcome IN ({values})"))


def _ts(name: str, *, nullable: bool = True, **kw: object) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable, **kw)  # type: ignore[arg-type]


def upgrade() -> None:
    op.create_table(
        "provider_batches",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("provider_batch_id", sa.String(length=100), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("request_bytes", sa.BigInteger(), nullable=False),
        sa.Column("succeeded", sa.Integer(), nullable=False),
        sa.Column("errored", sa.Integer(), nullable=False),
        sa.Column("expired", sa.Integer(), nullable=False),
        sa.Column("canceled", sa.Integer(), nullable=False),
        sa.Column("ingested", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        _ts("locked_until"),
        _ts("created_at", nullable=False, server_default=sa.text("now()")),
        _ts("submitted_at"),
        _ts("ended_at"),
        _ts("ingested_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_provider_batches")),
        sa.UniqueConstraint(
            "provider_batch_id", name=op.f("uq_provider_batches_provider_batch_id")
        ),
    )
    with op.batch_alter_table("provider_batches") as batch:
        batch.create_index(batch.f("ix_provider_batches_status"), ["status"], unique=False)
    op.create_table(
        "batch_requests",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.String(length=64), nullable=True),
        _ts("collected_at", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batch_requests")),
    )
    with op.batch_alter_table("batch_requests") as batch:
        batch.create_index(
            batch.f("ix_batch_requests_batch_id_collected_at"), ["batch_id", "collected_at"],
            unique=False,
        )  # fmt: skip
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("provider_batch_id", sa.String(length=64), nullable=True))
    _outcomes((*OUTCOMES, "expired", "canceled"))


def downgrade() -> None:
    _outcomes(OUTCOMES)
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("provider_batch_id")
    op.drop_table("batch_requests")
    op.drop_table("provider_batches")
