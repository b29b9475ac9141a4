"""Broker consumers (pipeline-console consume): registered when they start, seen at every
heartbeat, with what they have taken from their broker so far."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from pipeline_console.models.base import Base, UTCDateTime


class IntakeConsumer(Base):
    """One consumer process on one queue (RabbitMQ) or durable consumer (NATS JetStream).
    `source` is the broker URL without its credentials. The counts are the process's own
    since it started: `received` taken from the broker, `acknowledged` acknowledged after
    their commit, `rejected` recorded as rejected (and acknowledged). `backlog` is what the
    broker reported waiting at the last heartbeat; `backlog_growing_since` when it began to
    grow from one heartbeat to the next (None once it stops growing). Status as for workers:
    stopped, lost (heartbeat older than CONSUMER_LOST_AFTER_S) or alive."""

    __tablename__ = "intake_consumers"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(500))
    queue: Mapped[str] = mapped_column(String(255))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    received: Mapped[int] = mapped_column(BigInteger, default=0)
    acknowledged: Mapped[int] = mapped_column(BigInteger, default=0)
    rejected: Mapped[int] = mapped_column(BigInteger, default=0)
    backlog: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    backlog_growing_since: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        CheckConstraint("kind IN ('rabbitmq', 'nats')", name="kind"),
        Index(None, "last_seen_at"),
    )
