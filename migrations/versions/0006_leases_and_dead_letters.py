"""leases on running jobs, the `abandoned` attempt outcome, dead letters

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 19:28:10.822962
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

OUTCOMES = ("succeeded", "invalid", "low_confidence", "timeout", "error", "failed")


def _outcomes(allowed: tuple[str, ...]) -> None:
    values = ", ".join(f"'{v}'" for v in allowed)
    with op.batch_alter_table("attempts") as batch:
        batch.drop_constraint(op.f("ck_attempts_attempt_outcome"), type_="check")
        batch.create_check_constraint("attempt_outcome", sa.text(f"outcome IN ({values})"))


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=True),
        sa.Column("task", sa.String(length=100), nullable=True),
        sa.Column("queue", sa.String(length=200), nullable=True),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("tries", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
    )
    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_dead_letters_created_at"), ["created_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_dead_letters_job_id"), ["job_id"], unique=False)

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("leased_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("lost_leased_at", sa.DateTime(timezone=True), nullable=True))

    _outcomes((*OUTCOMES, "abandoned"))


def downgrade() -> None:
    op.execute("UPDATE attempts SET outcome = 'error' WHERE outcome = 'abandoned'")
    _outcomes(OUTCOMES)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("lost_leased_at")
        batch_op.drop_column("lease_until")
        batch_op.drop_column("leased_at")

    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dead_letters_job_id"))
        batch_op.drop_index(batch_op.f("ix_dead_letters_created_at"))

    op.drop_table("dead_letters")
