"""downstream systems that connect to real ones: method, auth, headers, signing, TLS, a jq
body template, limits shared by every worker, a throttle; their secrets, encrypted

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 14:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from pipeline_console.models.base import UTCDateTime

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW_COLUMNS = ("method", "auth", "headers", "signing", "tls", "body_template", "max_in_flight",
               "max_per_second", "throttled_until", "rate_allowance", "rate_checked_at")


def upgrade() -> None:
    # plain ADD COLUMNs (SQLite's batch mode would rebuild a table that deliveries and circuits
    # refer to); the method is checked by the API (POST, PUT or PATCH)
    columns = [
        sa.Column("method", sa.String(length=8), nullable=False, server_default="POST"),
        sa.Column("auth", sa.JSON(), nullable=True),  # without its secrets
        sa.Column("headers", sa.JSON(), nullable=True),
        sa.Column("signing", sa.JSON(), nullable=True),  # without its secrets
        sa.Column("tls", sa.JSON(), nullable=True),  # without the client key
        sa.Column("body_template", sa.Text(), nullable=True),
        sa.Column("max_in_flight", sa.Integer(), nullable=True),
        sa.Column("max_per_second", sa.Float(), nullable=True),
        sa.Column("throttled_until", UTCDateTime(timezone=True), nullable=True),
        sa.Column("rate_allowance", sa.Float(), nullable=True),
        sa.Column("rate_checked_at", UTCDateTime(timezone=True), nullable=True),
    ]
    assert tuple(column.name for column in columns) == NEW_COLUMNS
    for column in columns:
        op.add_column("downstream_systems", column)
    op.create_table(
        "system_secrets",
        sa.Column("system", sa.String(length=64), nullable=False),
        sa.Column("slot", sa.String(length=32), nullable=False),
        sa.Column("ciphertext", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(length=32), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["system"], ["downstream_systems.name"],
                                name=op.f("fk_system_secrets_system_downstream_systems")),
        sa.PrimaryKeyConstraint("system", "slot", name=op.f("pk_system_secrets")),
    )


def downgrade() -> None:
    op.drop_table("system_secrets")
    for column in reversed(NEW_COLUMNS):  # SQLite ≥ 3.35 drops a column in place
        op.execute(f"ALTER TABLE downstream_systems DROP COLUMN {column}")
