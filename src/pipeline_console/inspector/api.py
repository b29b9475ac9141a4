"""GET /api/v1/inspect/{key}: what happened to record X, and why."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel

from pipeline_console.anomalies.api import AnomalyRead
from pipeline_console.api.dependencies import DatabaseDep
from pipeline_console.api.problems import problem_responses
from pipeline_console.audit.api import AuditEventRead
from pipeline_console.auth.dependencies import VIEWER
from pipeline_console.delivery import schemas as delivery
from pipeline_console.errors import FieldError, InvalidInput
from pipeline_console.inspector.service import inspect_event, inspect_record
from pipeline_console.records.schemas import AttemptRead, ProductionRead, StagingRead
from pipeline_console.replay.api import ExecutionRead, ItemRead, ReplayRead

router = APIRouter(tags=["explainability"])


class StateRead(BaseModel):
    idempotency_key: str
    entity_type: str
    entity_id: str
    current_version: int
    payload_hash: str
    source_system: str
    first_seen_at: datetime
    updated_at: datetime


class CorrelationLink(BaseModel):
    correlation_id: str
    idempotency_key: str
    source_system: str
    version: int
    created_at: datetime
    sibling: bool  # another record of the same business event


class ReplayOfRecord(BaseModel):
    request: ReplayRead
    item: ItemRead


class TimelineEntry(BaseModel):
    at: datetime
    kind: str
    summary: str
    ref: dict[str, Any]


class InspectRead(BaseModel):
    state: StateRead
    attempts: list[AttemptRead]
    staging: list[StagingRead]
    production: ProductionRead | None
    correlations: list[CorrelationLink]
    anomalies: list[AnomalyRead]
    deliveries: list[delivery.DeliveryRead]
    delivery_attempts: list[delivery.AttemptRead]
    dlq: list[delivery.DeadLetterRead]
    ambiguous: list[delivery.AmbiguousRead]
    circuits: list[delivery.CircuitRead]
    replays: list[ReplayOfRecord]
    replay_executions: list[ExecutionRead]
    audit: list[AuditEventRead]
    timeline: list[TimelineEntry]
    totals: dict[str, int]
    limit: int


class EventInspectRead(BaseModel):
    correlation_id: str | None
    message_id: str | None
    records: list[StateRead]
    production: list[ProductionRead]
    attempts: list[AttemptRead]
    timeline: list[TimelineEntry]
    totals: dict[str, int]
    limit: int


Ref = Annotated[str | None, Query(min_length=1, max_length=256)]


@router.get(
    "/inspect", dependencies=[VIEWER],
    response_model=EventInspectRead, responses=problem_responses(404, 422),
    summary="Inspect by correlation id (the business event) or by message id",
    description="Give exactly one of `correlation_id` and `message_id`. The answer lists the "
    "records involved (each can be opened with /inspect/{key}), their attempts, and one "
    "timeline.",
)
async def inspect_by_reference(database: DatabaseDep, correlation_id: Ref = None,
                               message_id: Ref = None,
                               limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> Any:
    if (correlation_id is None) == (message_id is None):
        raise InvalidInput("give exactly one of correlation_id and message_id", [
            FieldError(field="correlation_id", location="query",
                       message="give exactly one of correlation_id and message_id")])
    async with database.read() as session:
        found = await inspect_event(session, correlation_id=correlation_id,
                                    message_id=message_id, limit=limit)
        return EventInspectRead(
            correlation_id=correlation_id, message_id=message_id,
            records=[StateRead.model_validate(r, from_attributes=True) for r in found.states],
            production=[ProductionRead.model_validate(r) for r in found.production],
            attempts=[AttemptRead.model_validate(r) for r in found.attempts],
            timeline=[TimelineEntry(at=e.at, kind=e.kind, summary=e.summary, ref=e.ref)
                      for e in found.timeline],
            totals=found.totals, limit=limit)


@router.get(
    "/inspect/{key:path}", dependencies=[VIEWER],
    response_model=InspectRead, responses=problem_responses(404, 422),
    summary="One record's whole history, from every table, with a timeline that explains it",
    description="Every section is present, even when empty. Each list holds its newest "
    "`limit` rows; `totals` says how many there are in all.",
)
async def inspect(database: DatabaseDep,
                  key: Annotated[str, Path(description="{entity_type}:{entity_id}")],
                  limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> Any:
    async with database.read() as session:
        found = await inspect_record(session, key, limit=limit)
        sections = found.sections
        return InspectRead(
            state=StateRead.model_validate(found.state, from_attributes=True),
            attempts=[AttemptRead.model_validate(r) for r in sections["attempts"]],
            staging=[StagingRead.model_validate(r) for r in sections["staging"]],
            production=(ProductionRead.model_validate(found.production)
                        if found.production else None),
            correlations=[CorrelationLink(
                correlation_id=r.correlation_id, idempotency_key=r.idempotency_key,
                source_system=r.source_system, version=r.version, created_at=r.created_at,
                sibling=r.idempotency_key != key) for r in sections["correlations"]],
            anomalies=[AnomalyRead.model_validate(r) for r in sections["anomalies"]],
            deliveries=[delivery.DeliveryRead.model_validate(r)
                        for r in sections["deliveries"]],
            delivery_attempts=[delivery.AttemptRead.model_validate(r)
                               for r in sections["delivery_attempts"]],
            dlq=[delivery.DeadLetterRead.model_validate(r) for r in sections["dlq"]],
            ambiguous=[delivery.AmbiguousRead.model_validate(r)
                       for r in sections["ambiguous"]],
            circuits=[delivery.CircuitRead.model_validate(r) for r in sections["circuits"]],
            replays=[ReplayOfRecord(request=ReplayRead.model_validate(request),
                                    item=ItemRead.model_validate(item))
                     for request, item in sections["replays"]],
            replay_executions=[ExecutionRead.model_validate(r)
                               for r in sections["replay_executions"]],
            audit=[AuditEventRead.model_validate(r) for r in sections["audit"]],
            timeline=[TimelineEntry(at=e.at, kind=e.kind, summary=e.summary, ref=e.ref)
                      for e in found.timeline],
            totals=found.totals, limit=limit,
        )
