"""GET /api/v1/inspect/{key}: what happened to record X, and why."""

from __future__ import annotations

from datetime import datetime
from operator import itemgetter
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query
from fastapi.responses import Response
from pydantic import BaseModel

from pipeline_console.anomalies.api import AnomalyRead
from pipeline_console.api.dependencies import DatabaseDep
from pipeline_console.api.problems import problem_responses
from pipeline_console.audit.api import AuditEventRead
from pipeline_console.auth.dependencies import VIEWER
from pipeline_console.delivery import schemas as delivery
from pipeline_console.errors import FieldError, InvalidInput
from pipeline_console.inspector.service import inspect_event, inspect_record
from pipeline_console.inspector.stored_json import fragment
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
        try:
            return Response(inspect_json(found, key, limit), media_type="application/json")
        except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits in a payload
            return inspect_model(found, key, limit)


# The long sections are written straight from the rows: their schemas are plain (one field
# per column, no alias, no default computed from others), so the row's values are the
# schema's values. Building a pydantic model per row, then letting FastAPI validate and dump
# the ~1 MB answer of a 200-event key again, was most of the route's time (benchmark 4's
# profile, bench/notes/45-large.md); tests/inspector checks that both ways give the same JSON.
_PLAIN = {"attempts": AttemptRead, "staging": StagingRead, "deliveries": delivery.DeliveryRead,
          "delivery_attempts": delivery.AttemptRead, "audit": AuditEventRead}
_FIELDS = {name: tuple(model.model_fields) for name, model in _PLAIN.items()}
_DEFAULTS = {name: {field: info.default for field, info in model.model_fields.items()
                    if not info.is_required()} for name, model in _PLAIN.items()}


def _plain(section: str, rows: list[Any]) -> list[dict[str, Any]]:
    """The rows' values of the section schema's fields, by position (a Core row's attribute
    access by name costs more than the rest of the work)."""
    if not rows:
        return []
    fields, columns = _FIELDS[section], rows[0]._fields
    present = [field for field in fields if field in columns]
    pick = itemgetter(*[columns.index(field) for field in present])
    defaults = {field: _DEFAULTS[section][field] for field in fields if field not in columns}
    if len(present) == 1:
        return [{present[0]: pick(row), **defaults} for row in rows]
    return [{**dict(zip(present, pick(row), strict=True)), **defaults} for row in rows]


def _dump(model: type[BaseModel], rows: list[Any]) -> list[dict[str, Any]]:
    return [model.model_validate(row).model_dump(mode="json", by_alias=True) for row in rows]


def inspect_body(found: Any, key: str, limit: int) -> dict[str, Any]:
    """The InspectRead answer as plain data for orjson (`inspect_json`): the long sections
    from the rows, the short ones through their models."""
    sections = found.sections
    return {
        "state": StateRead.model_validate(found.state, from_attributes=True).model_dump(
            mode="json", by_alias=True),
        **{name: _plain(name, sections[name]) for name in ("attempts", "staging")},
        "production": (ProductionRead.model_validate(found.production).model_dump(
            mode="json", by_alias=True) if found.production else None),
        "correlations": [{
            "correlation_id": r.correlation_id, "idempotency_key": r.idempotency_key,
            "source_system": r.source_system, "version": r.version,
            "created_at": r.created_at, "sibling": r.idempotency_key != key}
            for r in sections["correlations"]],
        "anomalies": _dump(AnomalyRead, sections["anomalies"]),
        **{name: _plain(name, sections[name]) for name in ("deliveries", "delivery_attempts")},
        "dlq": _dump(delivery.DeadLetterRead, sections["dlq"]),
        "ambiguous": _dump(delivery.AmbiguousRead, sections["ambiguous"]),
        "circuits": _dump(delivery.CircuitRead, sections["circuits"]),
        "replays": [ReplayOfRecord(request=ReplayRead.model_validate(request),
                                   item=ItemRead.model_validate(item)).model_dump(
                                       mode="json", by_alias=True)
                    for request, item in sections["replays"]],
        "replay_executions": _dump(ExecutionRead, sections["replay_executions"]),
        "audit": _plain("audit", sections["audit"]),
        "timeline": [{"at": e.at, "kind": e.kind, "summary": e.summary, "ref": e.ref}
                     for e in found.timeline],
        "totals": found.totals, "limit": limit,
    }


def inspect_json(found: Any, key: str, limit: int) -> bytes:
    """The answer's bytes: `inspect_body` written by orjson with OPT_UTC_Z (as pydantic
    writes UTC datetimes) and the payloads written as the database holds them."""
    return orjson.dumps(inspect_body(found, key, limit), default=fragment,
                        option=orjson.OPT_UTC_Z)


def inspect_model(found: Any, key: str, limit: int) -> InspectRead:
    """The same answer through the pydantic models (what FastAPI then validates and dumps)."""
    sections = found.decoded_sections()
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
