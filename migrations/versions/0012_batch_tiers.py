"""Message Batches per tier: each collected request and each provider batch names its
rung of the ladder (existing rows were the default fleet's top rung, `frontier`)

Revision ID: 0012_batch_tiers
Revises: 0011_api_batch_keys
Create Date: 2026-12-08 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012_batch_tiers"
down_revision = "0011_api_batch_keys"
branch_labels = None
depends_on = None

_EXISTING = "frontier"  # the only tier that ran Message Batches before the ladder


def upgrade() -> None:
    for table in ("batch_requests", "provider_batches"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("tier", sa.String(length=32), nullable=False, server_default=_EXISTING)
            )
        with op.batch_alter_table(table) as batch:
            batch.alter_column("tier", server_default=None)  # every new row names its tier
    with op.batch_alter_table("batch_requests") as batch:
        batch.drop_index("ix_batch_requests_batch_id_collected_at")
        batch.create_index(
            batch.f("ix_batch_requests_batch_id_tier_collected_at"),
            ["batch_id", "tier", "collected_at"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("batch_requests") as batch:
        batch.drop_index("ix_batch_requests_batch_id_tier_collected_at")
        batch.create_index(
            batch.f("ix_batch_requests_batch_id_collected_at"),
            ["batch_id", "collected_at"],
            unique=False,
        )
    for table in ("provider_batches", "batch_requests"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("tier")
