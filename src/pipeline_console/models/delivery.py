"""The delivery pillar: downstream systems, the outbox of deliveries, the append-only attempt
log, the dead-letter queue, ambiguous outcomes and circuit breakers."""

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from pipeline_console.models.base import Base, BigId, UTCDateTime
from pipeline_console.models.records import (
    ENTITY_ID_LENGTH,
    KEY_LENGTH,
    NAME_LENGTH,
    REF_LENGTH,
)

DELIVERY_STATUSES = ("pending", "in_flight", "delivered", "dead_lettered", "ambiguous", "held",
                     "superseded")
TRIGGERS = ("scheduled", "manual", "replay", "resolution")
# worker_lost: the worker that held the claim stopped (or its lease ran out) before it
# recorded an answer. Ambiguous for the delivery, but not the downstream system's doing.
CLASSIFICATIONS = ("success", "transient", "permanent", "ambiguous", "worker_lost")


def _in(column: str, words: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(word) for word in words)})"


class DownstreamSystem(Base):
    __tablename__ = "downstream_systems"

    name: Mapped[str] = mapped_column(String(NAME_LENGTH), primary_key=True)
    transport: Mapped[str] = mapped_column(String(16))
    url: Mapped[str | None] = mapped_column(Text, nullable=True)
    status_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    entity_types: Mapped[list[str]] = mapped_column(JSON)
    timeout_s: Mapped[float] = mapped_column(Float)
    max_attempts: Mapped[int] = mapped_column(Integer)
    backoff_base_s: Mapped[float] = mapped_column(Float)
    backoff_max_s: Mapped[float] = mapped_column(Float)
    failure_threshold: Mapped[int] = mapped_column(Integer)
    classification_overrides: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    simulation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Connecting to real systems (migration 0011). auth, signing and tls hold no secret:
    # those are in system_secrets, encrypted.
    method: Mapped[str] = mapped_column(String(8), server_default="POST", default="POST")
    auth: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    headers: Mapped[dict[str, str] | None] = mapped_column(JSON, nullable=True)
    signing: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    tls: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    body_template: Mapped[str | None] = mapped_column(Text, nullable=True)
    max_in_flight: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_per_second: Mapped[float | None] = mapped_column(Float, nullable=True)
    # A 429/503 with Retry-After: nothing is claimed for this system before then.
    throttled_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # max_per_second's token bucket, shared by every worker: the sends allowed as of when.
    rate_allowance: Mapped[float | None] = mapped_column(Float, nullable=True)
    rate_checked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (CheckConstraint("transport IN ('http', 'simulated')", name="transport"),)


class SystemSecret(Base):
    """A downstream system's secrets, encrypted with PIPELINE_CONSOLE_SECRET_KEY (secrets.py).
    Slots: auth (a token, password, header value or client secret), signing (the current
    signing secret), signing_previous (until expires_at: a rotation's overlap),
    tls_client_key."""

    __tablename__ = "system_secrets"

    system: Mapped[str] = mapped_column(ForeignKey("downstream_systems.name"), primary_key=True)
    slot: Mapped[str] = mapped_column(String(32), primary_key=True)
    ciphertext: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Circuit(Base):
    """One breaker per system, shared by every worker through the database."""

    __tablename__ = "circuits"

    system: Mapped[str] = mapped_column(ForeignKey("downstream_systems.name"), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    consecutive_failures: Mapped[int] = mapped_column(Integer)
    trial_delivery_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    changed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (CheckConstraint("state IN ('closed', 'open', 'half_open')", name="state"),)


class Delivery(Base):
    """One promoted version of one record, to one system (the outbox row)."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    system: Mapped[str] = mapped_column(ForeignKey("downstream_systems.name"))
    idempotency_key: Mapped[str] = mapped_column(String(KEY_LENGTH))
    entity_type: Mapped[str] = mapped_column(String(NAME_LENGTH))
    entity_id: Mapped[str] = mapped_column(String(ENTITY_ID_LENGTH))
    version: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    correlation_id: Mapped[str | None] = mapped_column(String(REF_LENGTH), nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    claimed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    claim_trigger: Mapped[str | None] = mapped_column(String(16), nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        CheckConstraint(_in("status", DELIVERY_STATUSES), name="status"),
        Index(None, "status", "next_attempt_at"),
        Index(None, "system", "status", "id"),
        Index(None, "idempotency_key", "system", "version"),
        Index(None, "status", "system", "created_at"),
        Index(None, "delivered_at"),
    )


class DeliveryAttempt(Base):
    """Every try, whatever triggered it. Append-only: the database refuses UPDATE and DELETE."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"))
    system: Mapped[str] = mapped_column(String(NAME_LENGTH))
    attempt_number: Mapped[int] = mapped_column(Integer)
    trigger: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    response_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response_body: Mapped[str | None] = mapped_column(Text, nullable=True)
    classification: Mapped[str] = mapped_column(String(16))
    rule: Mapped[str] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        CheckConstraint(_in("trigger", TRIGGERS), name="trigger"),
        CheckConstraint(_in("classification", CLASSIFICATIONS), name="classification"),
        Index(None, "delivery_id", "id"),
        Index(None, "system", "started_at"),
        Index(None, "started_at", "system", "classification"),
        # The target of replay_executions' composite foreign key.
        Index(None, "id", "delivery_id", "trigger", unique=True),
    )


class DeadLetter(Base):
    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"))
    system: Mapped[str] = mapped_column(String(NAME_LENGTH))
    idempotency_key: Mapped[str] = mapped_column(String(KEY_LENGTH))
    reason: Mapped[str] = mapped_column(Text)
    classification: Mapped[str] = mapped_column(String(16))
    attempt_id: Mapped[int | None] = mapped_column(ForeignKey("delivery_attempts.id"),
                                                   nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        CheckConstraint("status IN ('open', 'closed')", name="status"),
        Index(None, "system", "status", "id"),
        Index(None, "status", "id"),
        Index(None, "delivery_id"),
        Index(None, "created_at"),
        Index(None, "idempotency_key", "id"),
    )


class AmbiguousOutcome(Base):
    """A send whose result is unknown: never retried blindly."""

    __tablename__ = "ambiguous_outcomes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"))
    system: Mapped[str] = mapped_column(String(NAME_LENGTH))
    idempotency_key: Mapped[str] = mapped_column(String(KEY_LENGTH))
    reason: Mapped[str] = mapped_column(Text)
    attempt_id: Mapped[int | None] = mapped_column(ForeignKey("delivery_attempts.id"),
                                                   nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    queries: Mapped[int] = mapped_column(Integer)
    last_query_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_query_result: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    resolution: Mapped[str | None] = mapped_column(String(16), nullable=True)
    resolution_note: Mapped[str | None] = mapped_column(Text, nullable=True)
    resolved_by: Mapped[str | None] = mapped_column(String(128), nullable=True)

    __table_args__ = (
        CheckConstraint("status IN ('open', 'resolved')", name="status"),
        CheckConstraint("resolution IS NULL OR resolution IN ('delivered', 'not_delivered')",
                        name="resolution"),
        Index(None, "status", "id"),
        Index(None, "delivery_id"),
        Index(None, "idempotency_key", "id"),
    )


class Worker(Base):
    """A worker process: registered when it starts, seen at every heartbeat. Its status is
    derived: stopped once it said so, lost once its heartbeat is older than
    WORKER_LOST_AFTER_S, alive otherwise."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (Index(None, "last_seen_at"),)
