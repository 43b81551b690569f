"""batches.spent_usd: what a capped batch's attempts have cost, checked before each call

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 18:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(
            sa.Column(
                "spent_usd",
                sa.Numeric(precision=18, scale=8),
                server_default="0",
                nullable=False,
            )
        )
    # Capped batches that already spent: what their jobs cost so far.
    op.execute(
        "UPDATE batches SET spent_usd = COALESCE("
        "(SELECT SUM(jobs.cost_usd) FROM jobs WHERE jobs.batch_id = batches.id), 0) "
        "WHERE spend_cap_usd IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("spent_usd")
