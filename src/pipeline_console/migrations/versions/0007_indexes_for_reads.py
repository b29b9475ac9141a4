"""indexes for the dashboard, the inspector and the reports (chosen with EXPLAIN on a
database of a million messages; see docs/benchmarks.md)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24 07:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, columns): each index is named by the models' naming convention
INDEXES = [
    # the dashboard's rates (and the reports): decisions and outcomes by time, read from the
    # index alone; the first replaces the index on received_at alone
    ("ingestion_attempts", ["received_at", "decision"]),
    ("delivery_attempts", ["started_at", "system", "classification"]),
    # the delivery report: deliveries completed in a range
    ("deliveries", ["delivered_at"]),
    # the dashboard's delivery backlog: per system, the oldest waiting delivery
    ("deliveries", ["status", "system", "created_at"]),
    # the anomalies, delivery and replays reports: rows opened or made in a range
    ("anomalies", ["opened_at"]),
    ("dead_letters", ["created_at"]),
    ("replay_requests", ["created_at"]),
    # the inspector: one record's dead letters and ambiguous outcomes
    ("dead_letters", ["idempotency_key", "id"]),
    ("ambiguous_outcomes", ["idempotency_key", "id"]),
]


def _name(table: str, columns: list[str]) -> str:
    return f"ix_{table}_{'_'.join(columns)}"


def upgrade() -> None:
    with op.batch_alter_table("ingestion_attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ingestion_attempts_received_at"))
    for table, columns in INDEXES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_index(batch_op.f(_name(table, columns)), columns, unique=False)


def downgrade() -> None:
    for table, columns in reversed(INDEXES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(batch_op.f(_name(table, columns)))
    with op.batch_alter_table("ingestion_attempts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ingestion_attempts_received_at"), ["received_at"],
                              unique=False)
