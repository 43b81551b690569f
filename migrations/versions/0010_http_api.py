"""HTTP API: bearer tokens (hashed) mapped to a team, the team on a job, OpenAI-style
files and batches

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 11:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

JSONDoc = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def _ts(name: str, *, nullable: bool = True, **kw: object) -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable, **kw)  # type: ignore[arg-type]


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("team", sa.String(length=100), nullable=False),
        sa.Column("feature", sa.String(length=100), nullable=True),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("rate_limit", sa.String(length=32), nullable=True),
        _ts("created_at", nullable=False, server_default=sa.text("now()")),
        _ts("revoked_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_api_tokens_token_sha256")),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("team", sa.String(length=100), nullable=True))
    op.create_table(
        "api_files",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("team", sa.String(length=100), nullable=False),
        sa.Column("purpose", sa.String(length=32), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        _ts("created_at", nullable=False, server_default=sa.text("now()")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_files")),
    )
    op.create_table(
        "api_batches",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("team", sa.String(length=100), nullable=False),
        sa.Column("input_file_id", sa.String(length=40), nullable=False),
        sa.Column("endpoint", sa.String(length=64), nullable=False),
        sa.Column("completion_window", sa.String(length=16), nullable=False),
        sa.Column("metadata", JSONDoc, nullable=True),
        sa.Column("batch_id", sa.String(length=64), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        _ts("created_at", nullable=False, server_default=sa.text("now()")),
        _ts("cancelling_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_batches")),
    )
    with op.batch_alter_table("api_batches") as batch:
        batch.create_index(
            batch.f("ix_api_batches_team_created_at"), ["team", "created_at"], unique=False
        )


def downgrade() -> None:
    op.drop_table("api_batches")
    op.drop_table("api_files")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("team")
    op.drop_table("api_tokens")
