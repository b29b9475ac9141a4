"""The audit log: append-only (database triggers refuse UPDATE and DELETE) and hash-chained."""

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, CheckConstraint, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from pipeline_console.models.base import Base, UTCDateTime
from pipeline_console.models.records import HASH_LENGTH, KEY_LENGTH, NAME_LENGTH


class AuditEvent(Base):
    __tablename__ = "audit_events"

    # Assigned by the writer under the chain lock (not by a sequence), so that id order is
    # chain order and the id is part of the hashed content.
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(NAME_LENGTH * 2))
    action: Mapped[str] = mapped_column(String(64))
    subject_type: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[str] = mapped_column(String(KEY_LENGTH))
    idempotency_key: Mapped[str | None] = mapped_column(String(KEY_LENGTH), nullable=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(HASH_LENGTH))
    row_hash: Mapped[str] = mapped_column(String(HASH_LENGTH))

    __table_args__ = (
        # the chain starts at 1: a row 0 or -1 slipped in before it is refused
        CheckConstraint("id >= 1", name="positive_id"),
        Index(None, "idempotency_key", "id"),
        Index(None, "subject_type", "subject_id", "id"),
    )
