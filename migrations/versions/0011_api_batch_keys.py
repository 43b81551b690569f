"""HTTP API batches: the create's idempotency key, how far its submission got (so that
one cut short is finished), its default feature, and the sizes of its result files

Revision ID: 0011_api_batch_keys
Revises: 0010
Create Date: 2026-12-05 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_api_batch_keys"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_batches") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(length=200), nullable=True))
        batch.add_column(
            sa.Column("state", sa.String(length=16), nullable=False, server_default="submitted")
        )
        batch.add_column(sa.Column("feature", sa.String(length=100), nullable=True))
        batch.add_column(sa.Column("error", sa.Text(), nullable=True))
        batch.add_column(sa.Column("output_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("error_bytes", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("files_as_of", sa.DateTime(timezone=True), nullable=True))
        batch.create_unique_constraint(
            batch.f("uq_api_batches_idempotency_key"), ["idempotency_key"]
        )


def downgrade() -> None:
    with op.batch_alter_table("api_batches") as batch:
        batch.drop_constraint(batch.f("uq_api_batches_idempotency_key"), type_="unique")
        for column in ("files_as_of", "error_bytes", "output_bytes", "error", "feature",
                       "state", "idempotency_key"):  # fmt: skip
            batch.drop_column(column)
