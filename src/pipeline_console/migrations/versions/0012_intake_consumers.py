"""intake consumers (pipeline-console consume): registration, heartbeat, counts, backlog

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from pipeline_console.models.base import UTCDateTime

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "intake_consumers",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("source", sa.String(length=500), nullable=False),
        sa.Column("queue", sa.String(length=255), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("received", sa.BigInteger(), nullable=False),
        sa.Column("acknowledged", sa.BigInteger(), nullable=False),
        sa.Column("rejected", sa.BigInteger(), nullable=False),
        sa.Column("backlog", sa.BigInteger(), nullable=True),
        sa.Column("backlog_growing_since", UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint("kind IN ('rabbitmq', 'nats')",
                           name=op.f("ck_intake_consumers_kind")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_intake_consumers")),
    )
    op.create_index(op.f("ix_intake_consumers_last_seen_at"), "intake_consumers",
                    ["last_seen_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_intake_consumers_last_seen_at"), table_name="intake_consumers")
    op.drop_table("intake_consumers")
