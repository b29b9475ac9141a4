"""GET /api/v1/workers: the worker processes, alive, lost or stopped, with their claims."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, Query
from pydantic import BaseModel

from pipeline_console.api.dependencies import DatabaseDep, KeyPage, NowDep, SettingsDep
from pipeline_console.api.filters import Statuses, status_filter
from pipeline_console.api.problems import problem_responses
from pipeline_console.auth.dependencies import VIEWER
from pipeline_console.delivery.workers import list_workers
from pipeline_console.ingestion.schemas import UtcDatetime

router = APIRouter(tags=["delivery"])

WorkerStatus = Literal["alive", "lost", "stopped"]
WORKER_STATUS_WORDS = get_args(WorkerStatus)
WorkerStatuses = Annotated[Statuses | None, status_filter(WORKER_STATUS_WORDS)]


class WorkerRead(BaseModel):
    id: str
    host: str
    pid: int
    started_at: datetime
    last_seen_at: datetime
    status: WorkerStatus
    claims: int


class WorkerPage(BaseModel):
    items: list[WorkerRead]
    next_cursor: str | None


@router.get("/workers", dependencies=[VIEWER], response_model=WorkerPage,
            responses=problem_responses(422),
            summary="Worker processes: alive, lost (heartbeat older than WORKER_LOST_AFTER_S) "
                    "or stopped, with the deliveries each holds now")
async def get_workers(
    database: DatabaseDep, page: KeyPage, now: NowDep, settings: SettingsDep,
    status: WorkerStatuses = None,
    seen_from: Annotated[UtcDatetime | None, Query(
        alias="from", description="last seen at or after this time")] = None,
) -> Any:
    async with database.read() as session:
        items, cursor = await list_workers(session, page, now=now,
                                           lost_after_s=settings.worker_lost_after_s,
                                           status=set(status or ()), seen_from=seen_from)
    return {"items": items, "next_cursor": cursor}
