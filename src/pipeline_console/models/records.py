"""The correctness pillar's record tables: state, staging, production, correlation, entity types."""

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from pipeline_console.models.base import Base, BigId, UTCDateTime

NAME_LENGTH = 64
ENTITY_ID_LENGTH = 256
KEY_LENGTH = NAME_LENGTH + 1 + ENTITY_ID_LENGTH
REF_LENGTH = 256  # message ids and correlation ids
HASH_LENGTH = 64

STAGING_STATUSES = ("partial", "complete", "promoted", "superseded")


class EntityType(Base):
    """A kind of record. Without a JSON Schema every payload of the type is complete."""

    __tablename__ = "entity_types"

    name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    json_schema: Mapped[dict[str, Any] | None] = mapped_column("schema", JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RecordState(Base):
    """The idempotent state: one row per key, the highest accepted version and its hash."""

    __tablename__ = "record_states"

    idempotency_key: Mapped[str] = mapped_column(String(KEY_LENGTH), primary_key=True)
    entity_type: Mapped[str] = mapped_column(ForeignKey("entity_types.name"))
    entity_id: Mapped[str] = mapped_column(String(ENTITY_ID_LENGTH))
    current_version: Mapped[int] = mapped_column(BigInteger)
    payload_hash: Mapped[str] = mapped_column(String(HASH_LENGTH))
    source_system: Mapped[str] = mapped_column(String(NAME_LENGTH))
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        CheckConstraint("current_version >= 0", name="version_not_negative"),
        Index(None, "entity_type", "idempotency_key"),
        Index(None, "source_system", "idempotency_key"),
    )


class StagingRecord(Base):
    """One row per accepted version. partial → complete → promoted, or superseded by a newer one."""

    __tablename__ = "staging_records"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str] = mapped_column(ForeignKey("record_states.idempotency_key"))
    entity_type: Mapped[str] = mapped_column(String(NAME_LENGTH))
    entity_id: Mapped[str] = mapped_column(String(ENTITY_ID_LENGTH))
    version: Mapped[int] = mapped_column(BigInteger)
    source_system: Mapped[str] = mapped_column(String(NAME_LENGTH))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    payload_hash: Mapped[str] = mapped_column(String(HASH_LENGTH))
    status: Mapped[str] = mapped_column(String(16))
    validation_errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    correlation_id: Mapped[str | None] = mapped_column(String(REF_LENGTH), nullable=True)
    attempt_id: Mapped[int | None] = mapped_column(
        ForeignKey("ingestion_attempts.id"), nullable=True
    )
    anomaly_id: Mapped[int | None] = mapped_column(ForeignKey("anomalies.id"), nullable=True)
    staged_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    promoted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Set once by the stale_partial_sweep job when a partial record has waited too long.
    stale_since: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        CheckConstraint(
            "status IN ('partial', 'complete', 'promoted', 'superseded')", name="status"
        ),
        Index(None, "idempotency_key", "version"),
        Index(None, "status", "id"),
    )


class ProductionRecord(Base):
    """The production projection: one current row per key; its version never goes down."""

    __tablename__ = "production_records"

    idempotency_key: Mapped[str] = mapped_column(
        ForeignKey("record_states.idempotency_key"), primary_key=True
    )
    entity_type: Mapped[str] = mapped_column(String(NAME_LENGTH))
    entity_id: Mapped[str] = mapped_column(String(ENTITY_ID_LENGTH))
    version: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    payload_hash: Mapped[str] = mapped_column(String(HASH_LENGTH))
    source_system: Mapped[str] = mapped_column(String(NAME_LENGTH))
    correlation_id: Mapped[str | None] = mapped_column(String(REF_LENGTH), nullable=True)
    staging_id: Mapped[int] = mapped_column(ForeignKey("staging_records.id"))
    promoted_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index(None, "entity_type", "idempotency_key"),)


class Correlation(Base):
    """The correlation map: which records belong to one business event."""

    __tablename__ = "correlations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    correlation_id: Mapped[str] = mapped_column(String(REF_LENGTH))
    idempotency_key: Mapped[str] = mapped_column(ForeignKey("record_states.idempotency_key"))
    source_system: Mapped[str] = mapped_column(String(NAME_LENGTH))
    version: Mapped[int] = mapped_column(BigInteger)
    attempt_id: Mapped[int] = mapped_column(ForeignKey("ingestion_attempts.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        UniqueConstraint("correlation_id", "idempotency_key"),
        Index(None, "idempotency_key"),
    )


class IngestionAttempt(Base):
    """Every message ever received, with its decision and the reason in words. Append-only."""

    __tablename__ = "ingestion_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    decision: Mapped[str] = mapped_column(String(24))
    reason: Mapped[str] = mapped_column(Text)
    source_system: Mapped[str | None] = mapped_column(String(NAME_LENGTH), nullable=True)
    entity_type: Mapped[str | None] = mapped_column(String(NAME_LENGTH), nullable=True)
    entity_id: Mapped[str | None] = mapped_column(String(ENTITY_ID_LENGTH), nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(KEY_LENGTH), nullable=True)
    version: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    payload_hash: Mapped[str | None] = mapped_column(String(HASH_LENGTH), nullable=True)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    message_id: Mapped[str | None] = mapped_column(String(REF_LENGTH), nullable=True)
    correlation_id: Mapped[str | None] = mapped_column(String(REF_LENGTH), nullable=True)
    occurred_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    staging_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    anomaly_id: Mapped[int | None] = mapped_column(ForeignKey("anomalies.id"), nullable=True)
    raw_body: Mapped[str | None] = mapped_column(Text, nullable=True)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    # who posted it: the token's name and role, as the audit log names actors (None: before
    # migration 0010)
    actor: Mapped[str | None] = mapped_column(String(128), nullable=True)

    __table_args__ = (
        CheckConstraint(
            "decision IN ('accept_new', 'accept_supersede', 'skip_duplicate', 'quarantine', "
            "'skip_stale', 'rejected')",
            name="decision",
        ),
        Index(None, "idempotency_key", "id"),
        Index(None, "message_id"),
        Index(None, "received_at", "decision"),
        Index(None, "decision", "id"),
    )


class Anomaly(Base):
    """A same-version conflict: both payloads and their field diff, until a human resolves it."""

    __tablename__ = "anomalies"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str] = mapped_column(ForeignKey("record_states.idempotency_key"))
    version: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    current_payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    current_payload_hash: Mapped[str] = mapped_column(String(HASH_LENGTH))
    current_source_system: Mapped[str] = mapped_column(String(NAME_LENGTH))
    incoming_payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    incoming_payload_hash: Mapped[str] = mapped_column(String(HASH_LENGTH))
    incoming_source_system: Mapped[str] = mapped_column(String(NAME_LENGTH))
    incoming_message_id: Mapped[str | None] = mapped_column(String(REF_LENGTH), nullable=True)
    diff: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    resolution: Mapped[str | None] = mapped_column(String(24), nullable=True)
    resolution_note: Mapped[str | None] = mapped_column(Text, nullable=True)
    resolved_by: Mapped[str | None] = mapped_column(String(NAME_LENGTH * 2), nullable=True)

    __table_args__ = (
        CheckConstraint("status IN ('open', 'resolved')", name="status"),
        CheckConstraint(
            "resolution IS NULL OR resolution IN ('accept_incoming', 'keep_current')",
            name="resolution",
        ),
        CheckConstraint(
            "(status = 'open') = (resolution IS NULL)", name="resolved_has_resolution"
        ),
        Index(None, "status", "id"),
        Index(None, "idempotency_key", "version"),
        Index(None, "opened_at"),
    )
