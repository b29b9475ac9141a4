"""workers (registration and heartbeat) and the attempt classification worker_lost

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from pipeline_console.models.base import UTCDateTime

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BEFORE = "classification IN ('success', 'transient', 'permanent', 'ambiguous')"
AFTER = "classification IN ('success', 'transient', 'permanent', 'ambiguous', 'worker_lost')"


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_workers_last_seen_at"), ["last_seen_at"],
                              unique=False)
    _replace_classification_check(BEFORE, AFTER)


def downgrade() -> None:
    if op.get_bind().execute(sa.text(
            "SELECT 1 FROM delivery_attempts WHERE classification = 'worker_lost' LIMIT 1"
    )).first():
        raise RuntimeError("delivery_attempts holds worker_lost attempts, which revision 0007 "
                           "cannot represent; the attempt log is append-only, so this "
                           "downgrade stops here")
    _replace_classification_check(AFTER, BEFORE)
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_workers_last_seen_at"))
    op.drop_table("workers")


def _replace_classification_check(old: str, new: str) -> None:
    """delivery_attempts is append-only (triggers) and referenced by dead letters, ambiguous
    outcomes and replay executions, so on SQLite it cannot be rebuilt the way batch mode
    does (DROP TABLE fails the foreign keys, and cannot be turned off inside the migration's
    transaction). Only the CHECK's list of words changes, which no stored row can violate,
    so SQLite's own procedure for such a change applies (sqlite.org/lang_altertable.html,
    "Making Other Kinds Of Table Schema Changes"): edit the stored CREATE TABLE and bump the
    schema version so that every connection reads it again."""
    if op.get_bind().dialect.name != "sqlite":
        # named by the models' convention: "classification" becomes
        # ck_delivery_attempts_classification
        op.drop_constraint(op.f("ck_delivery_attempts_classification"), "delivery_attempts",
                           type_="check")
        # NOT VALID, then VALIDATE: the check of the existing rows (the largest table) runs
        # under a lock that lets attempts be inserted meanwhile
        op.create_check_constraint("classification", "delivery_attempts", sa.text(new),
                                   postgresql_not_valid=True)
        op.execute("ALTER TABLE delivery_attempts "
                   "VALIDATE CONSTRAINT ck_delivery_attempts_classification")
        return
    bind = op.get_bind()
    stored = bind.execute(sa.text(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'delivery_attempts'"
    )).scalar_one()
    if old not in stored:
        raise RuntimeError(f"delivery_attempts' CHECK is not the expected one: {stored}")
    version = bind.execute(sa.text("PRAGMA schema_version")).scalar_one()
    bind.execute(sa.text("PRAGMA writable_schema = ON"))
    bind.execute(sa.text(
        "UPDATE sqlite_master SET sql = :sql WHERE type = 'table' AND name = 'delivery_attempts'"
    ), {"sql": stored.replace(old, new)})
    bind.execute(sa.text(f"PRAGMA schema_version = {int(version) + 1}"))
    bind.execute(sa.text("PRAGMA writable_schema = OFF"))
