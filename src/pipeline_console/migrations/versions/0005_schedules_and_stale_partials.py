"""job schedules shared by workers; staging_records.stale_since

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 09:10:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import pipeline_console.models.base

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_schedules",
        sa.Column("job", sa.String(length=64), nullable=False),
        sa.Column(
            "next_run_at", pipeline_console.models.base.UTCDateTime(timezone=True), nullable=False
        ),
        sa.Column("claimed_by", sa.String(length=128), nullable=True),
        sa.Column(
            "claimed_at", pipeline_console.models.base.UTCDateTime(timezone=True), nullable=True
        ),
        sa.Column("last_period", sa.String(length=16), nullable=True),
        sa.PrimaryKeyConstraint("job", name=op.f("pk_job_schedules")),
    )
    with op.batch_alter_table("staging_records", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "stale_since",
                pipeline_console.models.base.UTCDateTime(timezone=True),
                nullable=True,
            )
        )


def downgrade() -> None:
    # A plain DROP COLUMN (SQLite ≥ 3.35): batch mode would rebuild staging_records, which
    # production_records.staging_id refers to, and fail once a record is promoted.
    op.drop_column("staging_records", "stale_since")
    op.drop_table("job_schedules")
