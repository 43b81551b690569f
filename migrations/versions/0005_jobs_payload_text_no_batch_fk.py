"""jobs.payload as text; jobs.batch_id without a foreign key

Both for bulk submission: Postgres neither parses a text payload nor checks a foreign key
row by row on COPY (together a third of its time per row).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 19:17:42.444720
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column(
            "payload",
            existing_type=sa.JSON(),
            type_=sa.Text(),
            existing_nullable=False,
            postgresql_using="payload::text",
        )
        batch.drop_constraint("fk_jobs_batch_id_batches", type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.create_foreign_key(
            "fk_jobs_batch_id_batches", "batches", ["batch_id"], ["id"], ondelete="CASCADE"
        )
        batch.alter_column(
            "payload",
            existing_type=sa.Text(),
            type_=sa.JSON(),
            existing_nullable=False,
            postgresql_using="payload::json",
        )
