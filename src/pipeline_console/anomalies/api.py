"""The data anomaly queue."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from pipeline_console.anomalies import service
from pipeline_console.api.dependencies import ActorDep, DatabaseDep, IdPage, NowDep
from pipeline_console.api.filters import ANOMALY_STATUS_WORDS, Statuses, status_filter
from pipeline_console.api.problems import problem_responses
from pipeline_console.auth.dependencies import OPERATOR, VIEWER
from pipeline_console.pagination import MAX_ID

router = APIRouter(tags=["anomalies"])

AnomalyId = Annotated[int, Path(ge=1, le=MAX_ID)]


class AnomalyRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    idempotency_key: str
    version: int
    status: Literal["open", "resolved"]
    current_payload: dict[str, Any]
    current_payload_hash: str
    current_source_system: str
    incoming_payload: dict[str, Any]
    incoming_payload_hash: str
    incoming_source_system: str
    incoming_message_id: str | None
    diff: list[dict[str, Any]] = Field(
        description="each differing field: path (JSON Pointer), change, current, incoming"
    )
    opened_at: datetime
    resolved_at: datetime | None
    resolution: Literal["accept_incoming", "keep_current"] | None
    resolution_note: str | None
    resolved_by: str | None


class AnomalyPage(BaseModel):
    items: list[AnomalyRead]
    next_cursor: str | None


Note = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000,
                           pattern=r"^[^\x00]*$")
]


class AnomalyResolve(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resolution: Literal["accept_incoming", "keep_current"]
    note: Note = Field(description="why; required, recorded in the audit log")


@router.get("/anomalies", dependencies=[VIEWER],
            response_model=AnomalyPage, responses=problem_responses(422),
            summary="Same-version conflicts, oldest first")
async def list_anomalies(
    database: DatabaseDep,
    page: IdPage,
    status: Annotated[Statuses | None, status_filter(ANOMALY_STATUS_WORDS)],
    key: Annotated[str | None, Query(max_length=321)] = None,
) -> AnomalyPage:
    async with database.read() as session:
        result = await service.list_anomalies(session, page, status=status, key=key)
        return AnomalyPage(items=[AnomalyRead.model_validate(row) for row in result.items],
                           next_cursor=result.next_cursor)


@router.get("/anomalies/{anomaly_id}", dependencies=[VIEWER], response_model=AnomalyRead,
            responses=problem_responses(404))
async def get_anomaly(database: DatabaseDep, anomaly_id: AnomalyId) -> AnomalyRead:
    async with database.read() as session:
        return AnomalyRead.model_validate(await service.get_anomaly(session, anomaly_id))


@router.post(
    "/anomalies/{anomaly_id}/resolve", dependencies=[OPERATOR],
    response_model=AnomalyRead,
    responses=problem_responses(404, 409, 422),
    summary="Resolve an anomaly: accept_incoming makes the quarantined payload current",
    description="accept_incoming is refused (409) once a newer version has been accepted for "
    "the key; keep_current dismisses the incoming payload. The note and the caller are recorded "
    "in the audit log.",
)
async def resolve_anomaly(
    database: DatabaseDep, anomaly_id: AnomalyId, body: AnomalyResolve, now: NowDep, actor: ActorDep
) -> AnomalyRead:
    async with database.transaction() as session:
        anomaly = await service.resolve_anomaly(
            session, anomaly_id, body.resolution, body.note, actor=actor.label, now=now
        )
        return AnomalyRead.model_validate(anomaly)
