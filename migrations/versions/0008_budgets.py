"""daily budgets: caps per scope, spend per scope and day, and why a job waits

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 19:10:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budgets",
        sa.Column("scope", sa.String(length=120), nullable=False),
        sa.Column("daily_cap_usd", sa.Numeric(precision=18, scale=8), nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("scope", name=op.f("pk_budgets")),
    )  # fmt: skip
    op.create_table(
        "budget_spend",
        sa.Column("scope", sa.String(length=120), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("spent_usd", sa.Numeric(precision=18, scale=8), nullable=False),
        sa.PrimaryKeyConstraint("scope", "day", name=op.f("pk_budget_spend")),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("hold_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("hold_reason")
    op.drop_table("budget_spend")
    op.drop_table("budgets")
