"""Wire shapes for records, staging, correlations and attempts."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class ORM(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ProductionRead(ORM):
    idempotency_key: str
    version: int
    payload: dict[str, Any]
    payload_hash: str
    source_system: str
    correlation_id: str | None
    staging_id: int
    promoted_at: datetime


class StagingRead(ORM):
    id: int
    idempotency_key: str
    entity_type: str
    entity_id: str
    version: int
    source_system: str
    status: Literal["partial", "complete", "promoted", "superseded"]
    payload: dict[str, Any]
    payload_hash: str
    validation_errors: list[dict[str, Any]] | None
    correlation_id: str | None
    attempt_id: int | None
    anomaly_id: int | None
    staged_at: datetime
    updated_at: datetime
    promoted_at: datetime | None
    stale_since: datetime | None = None  # set by stale_partial_sweep


class RecordRead(BaseModel):
    idempotency_key: str
    entity_type: str
    entity_id: str
    current_version: int
    payload_hash: str
    source_system: str
    first_seen_at: datetime
    updated_at: datetime
    production: ProductionRead | None
    staging: StagingRead | None


class RecordPage(BaseModel):
    items: list[RecordRead]
    next_cursor: str | None


class StagingPage(BaseModel):
    items: list[StagingRead]
    next_cursor: str | None


class CorrelatedRecordRead(RecordRead):
    linked_by_source_system: str
    linked_version: int
    linked_at: datetime


class CorrelationRead(BaseModel):
    correlation_id: str
    records: list[CorrelatedRecordRead]
    next_cursor: str | None


class AttemptRead(ORM):
    id: int
    received_at: datetime
    decision: str
    reason: str
    source_system: str | None
    entity_type: str | None
    entity_id: str | None
    idempotency_key: str | None
    version: int | None
    payload_hash: str | None
    payload: dict[str, Any] | None
    message_id: str | None
    correlation_id: str | None
    occurred_at: datetime | None
    staging_status: str | None
    anomaly_id: int | None
    raw_body: str | None
    errors: list[dict[str, Any]] | None
    actor: str | None = None  # the token that posted it ("name (role)")


class AttemptPage(BaseModel):
    items: list[AttemptRead]
    next_cursor: str | None
