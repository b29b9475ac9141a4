"""the actor of each ingestion attempt (the token that posted it)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # a plain ADD COLUMN on both databases (nullable, no default: no table rewrite); the
    # rows before it have no actor
    op.add_column("ingestion_attempts", sa.Column("actor", sa.String(length=128),
                                                  nullable=True))


def downgrade() -> None:
    # SQLite ≥ 3.35 drops a column in place: batch mode would rebuild the table, which
    # staging_records and correlations refer to
    op.execute("ALTER TABLE ingestion_attempts DROP COLUMN actor")
