"""Operator replay (API.md, "Replay")."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline_console.api.dependencies import ActorDep, DatabaseDep, IdPage, NowDep
from pipeline_console.api.filters import REPLAY_STATUS_WORDS, Statuses, status_filter
from pipeline_console.api.problems import problem, problem_responses
from pipeline_console.auth.dependencies import OPERATOR, VIEWER
from pipeline_console.delivery.api import DelivererDep
from pipeline_console.delivery.schemas import Reason
from pipeline_console.ingestion.schemas import Name, UtcDatetime
from pipeline_console.models import ReplayRequest
from pipeline_console.pagination import MAX_ID, fetch_page
from pipeline_console.replay import service
from pipeline_console.replay.service import MAX_ITEMS, Target

router = APIRouter(tags=["replay"])

Id = Annotated[int, Path(ge=1, le=MAX_ID)]


class ItemIn(BaseModel):
    """Either {"dlq_id"} or {"key", "system"}."""

    model_config = ConfigDict(extra="forbid")

    dlq_id: int | None = Field(default=None, ge=1, le=MAX_ID)
    key: str | None = Field(default=None, min_length=3, max_length=321,
                            pattern=r"^[^\x00-\x1f\x7f]+$")
    system: Name | None = None

    @model_validator(mode="after")
    def one_kind(self) -> ItemIn:
        if (self.dlq_id is None) == (self.key is None and self.system is None):
            raise ValueError('give either "dlq_id", or "key" and "system"')
        if self.dlq_id is None and (self.key is None or self.system is None):
            raise ValueError('"key" and "system" go together')
        return self


class FilterIn(BaseModel):
    """Every open dead letter of a system, optionally by reason text and time."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    system: Name
    reason_contains: str | None = Field(default=None, max_length=200,
                                        pattern=r"^[^\x00]*$")
    since: UtcDatetime | None = Field(default=None, alias="from")
    until: UtcDatetime | None = Field(default=None, alias="to")


class ReplayCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Reason
    items: list[ItemIn] | None = Field(default=None, min_length=1, max_length=MAX_ITEMS)
    filter: FilterIn | None = None
    allow_delivered: bool = Field(default=False, description="send again what was delivered")

    @model_validator(mode="after")
    def items_or_filter(self) -> ReplayCreate:
        if (self.items is None) == (self.filter is None):
            raise ValueError('give either "items" or "filter"')
        return self


class ItemRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    position: int
    dlq_id: int | None
    key: str | None = Field(validation_alias="idempotency_key")
    system: str | None
    version: int | None
    eligible: bool
    reason: str
    status: Literal["pending", "executing", "executed", "refused"]


class ExecutionRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    item_id: int
    delivery_id: int
    delivery_attempt_id: int
    outcome: str
    executed_by: str
    executed_at: datetime


class ReplayRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    status: Literal["validated", "rejected", "executing", "completed", "failed"]
    reason: str
    selection: dict[str, Any]
    allow_delivered: bool
    requested_by: str
    created_at: datetime
    executed_by: str | None
    executed_at: datetime | None
    finished_at: datetime | None
    items: list[ItemRead] = []
    executions: list[ExecutionRead] = []


class ReplayPage(BaseModel):
    items: list[ReplayRead]
    next_cursor: str | None


async def _read(session: Any, request: ReplayRequest) -> ReplayRead:
    items, executions = await service.items_and_executions(session, request.id)
    return _assemble(request, items, executions)


def _assemble(request: ReplayRequest, items: list[Any], executions: list[Any]) -> ReplayRead:
    return ReplayRead.model_validate(request).model_copy(update={
        "items": [ItemRead.model_validate(item) for item in items],
        "executions": [ExecutionRead.model_validate(row) for row in executions]})


@router.post(
    "/replays", dependencies=[OPERATOR], response_model=ReplayRead, status_code=201,
    responses=problem_responses(409, 422),
    summary="Validate a replay request (all-or-nothing)",
    description="201 with status `validated` when every item is eligible. Otherwise 409: the "
    "problem's `items` give each item's `eligible` and `reason`, the request is stored as "
    "`rejected` and nothing is sent.",
)
async def create_replay(database: DatabaseDep, body: ReplayCreate, now: NowDep,
                        actor: ActorDep) -> Any:
    async with database.transaction() as session:
        if body.filter is not None:
            targets = await service.expand_filter(
                session, body.filter.system, body.filter.reason_contains, body.filter.since,
                body.filter.until)
        else:
            targets = [Target(dlq_id=item.dlq_id, key=item.key, system=item.system)
                       for item in body.items or []]
        request, _ = await service.create_replay(
            session, targets, reason=body.reason,
            selection=body.model_dump(mode="json", by_alias=True, exclude={"reason"}),
            allow_delivered=body.allow_delivered, actor=actor.label, now=now)
        read = await _read(session, request)
    return _answer(read)


class EligibleAgain(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Reason


@router.post(
    "/replays/{replay_id}/eligible", dependencies=[OPERATOR], response_model=ReplayRead,
    status_code=201, responses=problem_responses(404, 409, 422),
    summary="Request a rejected replay again with only its eligible items",
    description="A new request of the rejected one's eligible items, validated afresh: 201 "
    "`validated`, or 409 (stored `rejected`) if one of them is no longer eligible; 409 too "
    "when the request is not rejected or none of its items was eligible.",
)
async def request_eligible(database: DatabaseDep, replay_id: Id, body: EligibleAgain,
                           now: NowDep, actor: ActorDep) -> Any:
    async with database.transaction() as session:
        request, _ = await service.request_eligible(session, replay_id, reason=body.reason,
                                                    actor=actor.label, now=now)
        read = await _read(session, request)
    return _answer(read)


def _answer(read: ReplayRead) -> Any:
    """201 with a validated request; a rejected one is a 409 whose items say why."""
    if read.status == "rejected":
        refused = sum(1 for item in read.items if not item.eligible)
        detail = (f"{refused} of {len(read.items)} items are not eligible" if read.items
                  else "the request selects nothing to replay")
        return problem(
            409, f"{detail}; the request is stored as rejected (replay {read.id}) and "
            "nothing was sent",
            replay_id=read.id,
            items=[item.model_dump(mode="json") for item in read.items])
    return JSONResponse(read.model_dump(mode="json"), status_code=201)


@router.post("/replays/{replay_id}/execute", dependencies=[OPERATOR], response_model=ReplayRead,
             responses=problem_responses(404, 409),
             summary="Send every item through the canonical delivery path (once)")
async def execute(deliverer: DelivererDep, database: DatabaseDep, replay_id: Id,
                  actor: ActorDep) -> Any:
    request = await service.execute_replay(deliverer, replay_id, actor=actor.label)
    async with database.read() as session:
        return await _read(session, request)


@router.get("/replays", dependencies=[VIEWER],
            response_model=ReplayPage, summary="Replay requests, oldest first")
async def list_replays(
    database: DatabaseDep, page: IdPage,
    status: Annotated[Statuses | None, status_filter(REPLAY_STATUS_WORDS)],
    since: Annotated[UtcDatetime | None, Query(alias="from",
                                               description="created at or after")] = None,
    until: Annotated[UtcDatetime | None, Query(alias="to", description="created before")
                     ] = None,
) -> Any:
    conditions = []
    if since is not None:
        conditions.append(ReplayRequest.created_at >= since)
    if until is not None:
        conditions.append(ReplayRequest.created_at < until)
    async with database.read() as session:
        result = await fetch_page(session, ReplayRequest.id, page,
                                  equal=[(ReplayRequest.status, status)], where=conditions)
        found = await service.items_and_executions_of(
            session, [request.id for request in result.items])
        return {"items": [_assemble(request, *found[request.id]) for request in result.items],
                "next_cursor": result.next_cursor}


@router.get("/replays/{replay_id}", dependencies=[VIEWER], response_model=ReplayRead,
            responses=problem_responses(404),
            summary="A replay: its items with eligibility, and the execution log")
async def get_replay(database: DatabaseDep, replay_id: Id) -> Any:
    async with database.read() as session:
        return await _read(session, await service.get_replay(session, replay_id))
