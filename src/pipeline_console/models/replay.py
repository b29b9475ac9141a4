"""Operator replay: requests, their items with eligibility, and the execution log, whose
every row must reference the delivery attempt (trigger `replay`) that it produced."""

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from pipeline_console.models.base import Base, BigId, UTCDateTime
from pipeline_console.models.records import KEY_LENGTH, NAME_LENGTH

REQUEST_STATUSES = ("validated", "rejected", "executing", "completed", "failed")
ITEM_STATUSES = ("pending", "executing", "executed", "refused")


class ReplayRequest(Base):
    __tablename__ = "replay_requests"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    selection: Mapped[dict[str, Any]] = mapped_column(JSON)
    allow_delivered: Mapped[bool] = mapped_column(Boolean)
    requested_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    executed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    executed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        CheckConstraint("status IN ('validated', 'rejected', 'executing', 'completed', "
                        "'failed')", name="status"),
        Index(None, "status", "id"),
        Index(None, "created_at"),
    )


class ReplayItem(Base):
    __tablename__ = "replay_items"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("replay_requests.id"))
    position: Mapped[int] = mapped_column(Integer)
    # What was asked for, which may not exist (a refused item says so): no foreign key.
    dlq_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(KEY_LENGTH), nullable=True)
    system: Mapped[str | None] = mapped_column(String(NAME_LENGTH), nullable=True)
    version: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    eligible: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    # The delivery an execution took (set with status `executing`), so that an execution
    # interrupted by a crash can be finished from the attempt log.
    delivery_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    __table_args__ = (
        CheckConstraint("status IN ('pending', 'executing', 'executed', 'refused')",
                        name="status"),
        UniqueConstraint("request_id", "position"),
        Index(None, "idempotency_key"),
    )


class ReplayExecution(Base):
    """Proof that a replay took the canonical path: each row names the delivery attempt it
    produced. The composite foreign key to delivery_attempts (id, delivery_id, trigger), the
    check on attempt_trigger and the uniqueness of the attempt make a row impossible unless a
    real replay attempt of this very delivery exists, and no attempt backs two rows."""

    __tablename__ = "replay_executions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[int] = mapped_column(ForeignKey("replay_requests.id"))
    item_id: Mapped[int] = mapped_column(ForeignKey("replay_items.id"))
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"))
    delivery_attempt_id: Mapped[int] = mapped_column(BigInteger)
    attempt_trigger: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(String(16))
    executed_by: Mapped[str] = mapped_column(String(128))
    executed_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        ForeignKeyConstraint(
            ["delivery_attempt_id", "delivery_id", "attempt_trigger"],
            ["delivery_attempts.id", "delivery_attempts.delivery_id", "delivery_attempts.trigger"],
        ),
        CheckConstraint("attempt_trigger = 'replay'", name="replay_attempt"),
        UniqueConstraint("item_id"),
        UniqueConstraint("delivery_attempt_id"),
        Index(None, "request_id", "id"),
    )
