"""GET /api/v1/intake: the broker consumers, alive, lost or stopped, with their counts."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, Query
from pydantic import BaseModel

from pipeline_console.api.dependencies import DatabaseDep, KeyPage, NowDep, SettingsDep
from pipeline_console.api.filters import Statuses, status_filter
from pipeline_console.api.problems import problem_responses
from pipeline_console.auth.dependencies import VIEWER
from pipeline_console.consumers.registry import list_consumers
from pipeline_console.ingestion.schemas import UtcDatetime

router = APIRouter(tags=["intake"])

ConsumerStatus = Literal["alive", "lost", "stopped"]
CONSUMER_STATUS_WORDS = get_args(ConsumerStatus)
ConsumerStatuses = Annotated[Statuses | None, status_filter(CONSUMER_STATUS_WORDS)]
ConsumerKind = Literal["rabbitmq", "nats"]
CONSUMER_KINDS = get_args(ConsumerKind)


class ConsumerRead(BaseModel):
    id: str
    kind: ConsumerKind
    source: str
    queue: str
    host: str
    pid: int
    started_at: datetime
    last_seen_at: datetime
    stopped_at: datetime | None
    status: ConsumerStatus
    received: int
    acknowledged: int
    rejected: int
    backlog: int | None
    backlog_growing_since: datetime | None


class ConsumerPage(BaseModel):
    items: list[ConsumerRead]
    next_cursor: str | None


@router.get("/intake", dependencies=[VIEWER], response_model=ConsumerPage,
            responses=problem_responses(422),
            summary="Broker consumers (pipeline-console consume): alive, lost (heartbeat "
                    "older than CONSUMER_LOST_AFTER_S) or stopped, with what each received, "
                    "acknowledged and rejected since it started, and its broker's backlog; "
                    "`source` is the broker URL without credentials")
async def get_intake(
    database: DatabaseDep, page: KeyPage, now: NowDep, settings: SettingsDep,
    status: ConsumerStatuses = None, kind: ConsumerKind | None = None,
    seen_from: Annotated[UtcDatetime | None, Query(
        alias="from", description="last seen at or after this time")] = None,
    backlog_growing_before: Annotated[UtcDatetime | None, Query(
        description="the broker's backlog has been growing since this time or earlier")] = None,
) -> Any:
    async with database.read() as session:
        items, cursor = await list_consumers(
            session, page, now=now, lost_after_s=settings.consumer_lost_after_s,
            status=set(status or ()), kind=kind, seen_from=seen_from,
            backlog_growing_before=backlog_growing_before)
    return {"items": items, "next_cursor": cursor}
