"""GET /api/v1/workers: the worker processes, alive, lost or stopped, with their claims."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, Query
from pydantic import BaseModel

from pipeline_console.api.dependencies import DatabaseDep, KeyPage, NowDep, SettingsDep
from pipeline_console.api.problems import problem_responses
from pipeline_console.auth.dependencies import VIEWER
from pipeline_console.delivery.workers import list_workers
from pipeline_console.errors import FieldError, InvalidInput
from pipeline_console.ingestion.schemas import UtcDatetime

router = APIRouter(tags=["delivery"])

WorkerStatus = Literal["alive", "lost", "stopped"]


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


def statuses(value: str | None, allowed: tuple[str, ...]) -> set[str] | None:
    """A comma-separated list of status words (`alive,lost`), each one of `allowed`."""
    if value is None or not value.strip():
        return None
    words = {word.strip() for word in value.split(",") if word.strip()}
    unknown = sorted(words - set(allowed))
    if unknown:
        raise InvalidInput(f"unknown status {', '.join(unknown)}", [FieldError(
            field="status", location="query",
            message=f"each status must be one of {', '.join(allowed)}")])
    return words


@router.get("/workers", dependencies=[VIEWER], response_model=WorkerPage,
            responses=problem_responses(422),
            summary="Worker processes: alive, lost (heartbeat older than WORKER_LOST_AFTER_S) "
                    "or stopped, with the deliveries each holds now")
async def get_workers(
    database: DatabaseDep, page: KeyPage, now: NowDep, settings: SettingsDep,
    status: Annotated[str | None, Query(
        max_length=100, description="one or more of alive, lost, stopped, comma-separated",
        examples=["alive,lost"])] = None,
    seen_from: Annotated[UtcDatetime | None, Query(
        alias="from", description="last seen at or after this time")] = None,
) -> Any:
    wanted = statuses(status, get_args(WorkerStatus))
    async with database.read() as session:
        items, cursor = await list_workers(session, page, now=now,
                                           lost_after_s=settings.worker_lost_after_s,
                                           status=wanted, seen_from=seen_from)
    return {"items": items, "next_cursor": cursor}
