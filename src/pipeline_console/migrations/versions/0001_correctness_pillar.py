"""The correctness pillar: states, attempts, staging, production, correlations, anomalies, audit.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from pipeline_console.models.base import UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "entity_types",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("schema", sa.JSON(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_entity_types")),
    )
    op.create_table(
        "record_states",
        sa.Column("idempotency_key", sa.String(321), nullable=False),
        sa.Column("entity_type", sa.String(64), nullable=False),
        sa.Column("entity_id", sa.String(256), nullable=False),
        sa.Column("current_version", sa.BigInteger(), nullable=False),
        sa.Column("payload_hash", sa.String(64), nullable=False),
        sa.Column("source_system", sa.String(64), nullable=False),
        sa.Column("first_seen_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint(
            "current_version >= 0", name=op.f("ck_record_states_version_not_negative")
        ),
        sa.ForeignKeyConstraint(
            ["entity_type"], ["entity_types.name"],
            name=op.f("fk_record_states_entity_type_entity_types"),
        ),
        sa.PrimaryKeyConstraint("idempotency_key", name=op.f("pk_record_states")),
    )
    op.create_index(
        op.f("ix_record_states_entity_type_idempotency_key"),
        "record_states", ["entity_type", "idempotency_key"],
    )
    op.create_index(
        op.f("ix_record_states_source_system_idempotency_key"),
        "record_states", ["source_system", "idempotency_key"],
    )
    op.create_table(
        "anomalies",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("idempotency_key", sa.String(321), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("current_payload", sa.JSON(), nullable=False),
        sa.Column("current_payload_hash", sa.String(64), nullable=False),
        sa.Column("current_source_system", sa.String(64), nullable=False),
        sa.Column("incoming_payload", sa.JSON(), nullable=False),
        sa.Column("incoming_payload_hash", sa.String(64), nullable=False),
        sa.Column("incoming_source_system", sa.String(64), nullable=False),
        sa.Column("incoming_message_id", sa.String(256), nullable=True),
        sa.Column("diff", sa.JSON(), nullable=False),
        sa.Column("opened_at", UTCDateTime(), nullable=False),
        sa.Column("resolved_at", UTCDateTime(), nullable=True),
        sa.Column("resolution", sa.String(24), nullable=True),
        sa.Column("resolution_note", sa.Text(), nullable=True),
        sa.Column("resolved_by", sa.String(128), nullable=True),
        sa.CheckConstraint("status IN ('open', 'resolved')", name=op.f("ck_anomalies_status")),
        sa.CheckConstraint(
            "resolution IS NULL OR resolution IN ('accept_incoming', 'keep_current')",
            name=op.f("ck_anomalies_resolution"),
        ),
        sa.CheckConstraint(
            "(status = 'open') = (resolution IS NULL)",
            name=op.f("ck_anomalies_resolved_has_resolution"),
        ),
        sa.ForeignKeyConstraint(
            ["idempotency_key"], ["record_states.idempotency_key"],
            name=op.f("fk_anomalies_idempotency_key_record_states"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_anomalies")),
    )
    op.create_index(op.f("ix_anomalies_status_id"), "anomalies", ["status", "id"])
    op.create_index(
        op.f("ix_anomalies_idempotency_key_version"), "anomalies", ["idempotency_key", "version"]
    )
    op.create_table(
        "ingestion_attempts",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("decision", sa.String(24), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("source_system", sa.String(64), nullable=True),
        sa.Column("entity_type", sa.String(64), nullable=True),
        sa.Column("entity_id", sa.String(256), nullable=True),
        sa.Column("idempotency_key", sa.String(321), nullable=True),
        sa.Column("version", sa.BigInteger(), nullable=True),
        sa.Column("payload_hash", sa.String(64), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.Column("message_id", sa.String(256), nullable=True),
        sa.Column("correlation_id", sa.String(256), nullable=True),
        sa.Column("occurred_at", UTCDateTime(), nullable=True),
        sa.Column("staging_status", sa.String(16), nullable=True),
        sa.Column("anomaly_id", BigId, nullable=True),
        sa.Column("raw_body", sa.Text(), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.CheckConstraint(
            "decision IN ('accept_new', 'accept_supersede', 'skip_duplicate', 'quarantine', "
            "'skip_stale', 'rejected')",
            name=op.f("ck_ingestion_attempts_decision"),
        ),
        sa.ForeignKeyConstraint(
            ["anomaly_id"], ["anomalies.id"],
            name=op.f("fk_ingestion_attempts_anomaly_id_anomalies"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ingestion_attempts")),
    )
    op.create_index(
        op.f("ix_ingestion_attempts_idempotency_key_id"),
        "ingestion_attempts", ["idempotency_key", "id"],
    )
    op.create_index(op.f("ix_ingestion_attempts_message_id"), "ingestion_attempts", ["message_id"])
    op.create_index(
        op.f("ix_ingestion_attempts_received_at"), "ingestion_attempts", ["received_at"]
    )
    op.create_index(
        op.f("ix_ingestion_attempts_decision_id"), "ingestion_attempts", ["decision", "id"]
    )
    op.create_table(
        "staging_records",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("idempotency_key", sa.String(321), nullable=False),
        sa.Column("entity_type", sa.String(64), nullable=False),
        sa.Column("entity_id", sa.String(256), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("source_system", sa.String(64), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("payload_hash", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("validation_errors", sa.JSON(), nullable=True),
        sa.Column("correlation_id", sa.String(256), nullable=True),
        sa.Column("attempt_id", BigId, nullable=True),
        sa.Column("anomaly_id", BigId, nullable=True),
        sa.Column("staged_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("promoted_at", UTCDateTime(), nullable=True),
        sa.CheckConstraint(
            "status IN ('partial', 'complete', 'promoted', 'superseded')",
            name=op.f("ck_staging_records_status"),
        ),
        sa.ForeignKeyConstraint(
            ["idempotency_key"], ["record_states.idempotency_key"],
            name=op.f("fk_staging_records_idempotency_key_record_states"),
        ),
        sa.ForeignKeyConstraint(
            ["attempt_id"], ["ingestion_attempts.id"],
            name=op.f("fk_staging_records_attempt_id_ingestion_attempts"),
        ),
        sa.ForeignKeyConstraint(
            ["anomaly_id"], ["anomalies.id"],
            name=op.f("fk_staging_records_anomaly_id_anomalies"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_staging_records")),
    )
    op.create_index(
        op.f("ix_staging_records_idempotency_key_version"),
        "staging_records", ["idempotency_key", "version"],
    )
    op.create_index(op.f("ix_staging_records_status_id"), "staging_records", ["status", "id"])
    op.create_table(
        "production_records",
        sa.Column("idempotency_key", sa.String(321), nullable=False),
        sa.Column("entity_type", sa.String(64), nullable=False),
        sa.Column("entity_id", sa.String(256), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("payload_hash", sa.String(64), nullable=False),
        sa.Column("source_system", sa.String(64), nullable=False),
        sa.Column("correlation_id", sa.String(256), nullable=True),
        sa.Column("staging_id", BigId, nullable=False),
        sa.Column("promoted_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["idempotency_key"], ["record_states.idempotency_key"],
            name=op.f("fk_production_records_idempotency_key_record_states"),
        ),
        sa.ForeignKeyConstraint(
            ["staging_id"], ["staging_records.id"],
            name=op.f("fk_production_records_staging_id_staging_records"),
        ),
        sa.PrimaryKeyConstraint("idempotency_key", name=op.f("pk_production_records")),
    )
    op.create_index(
        op.f("ix_production_records_entity_type_idempotency_key"),
        "production_records", ["entity_type", "idempotency_key"],
    )
    op.create_table(
        "correlations",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("correlation_id", sa.String(256), nullable=False),
        sa.Column("idempotency_key", sa.String(321), nullable=False),
        sa.Column("source_system", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("attempt_id", BigId, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["idempotency_key"], ["record_states.idempotency_key"],
            name=op.f("fk_correlations_idempotency_key_record_states"),
        ),
        sa.ForeignKeyConstraint(
            ["attempt_id"], ["ingestion_attempts.id"],
            name=op.f("fk_correlations_attempt_id_ingestion_attempts"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_correlations")),
        sa.UniqueConstraint(
            "correlation_id", "idempotency_key",
            name=op.f("uq_correlations_correlation_id_idempotency_key"),
        ),
    )
    op.create_index(op.f("ix_correlations_idempotency_key"), "correlations", ["idempotency_key"])
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("occurred_at", UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("subject_type", sa.String(32), nullable=False),
        sa.Column("subject_id", sa.String(321), nullable=False),
        sa.Column("idempotency_key", sa.String(321), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("row_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index(
        op.f("ix_audit_events_idempotency_key_id"), "audit_events", ["idempotency_key", "id"]
    )
    op.create_index(
        op.f("ix_audit_events_subject_type_subject_id_id"),
        "audit_events", ["subject_type", "subject_id", "id"],
    )
    _make_append_only("audit_events")


def _make_append_only(table: str) -> None:
    """The database itself refuses UPDATE and DELETE (and, on PostgreSQL, TRUNCATE)."""
    if op.get_bind().dialect.name == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {verb} refused'); END"
            )
        return
    op.execute(
        """
        CREATE FUNCTION refuse_change_to_append_only_table() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END
        $$
        """
    )
    op.execute(
        f"CREATE TRIGGER {table}_no_update_delete BEFORE UPDATE OR DELETE ON {table} "
        "FOR EACH ROW EXECUTE FUNCTION refuse_change_to_append_only_table()"
    )
    op.execute(
        f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION refuse_change_to_append_only_table()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events")
        op.execute("DROP TRIGGER IF EXISTS audit_events_no_update_delete ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS refuse_change_to_append_only_table()")
    for table in (
        "audit_events", "correlations", "production_records", "staging_records",
        "ingestion_attempts", "anomalies", "record_states", "entity_types",
    ):
        op.drop_table(table)
