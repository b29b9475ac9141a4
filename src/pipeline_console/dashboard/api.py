"""GET /api/v1/dashboard."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel

from pipeline_console.api.dependencies import DatabaseDep, NowDep, SettingsDep
from pipeline_console.auth.dependencies import VIEWER
from pipeline_console.dashboard.service import attention, rates

router = APIRouter(tags=["explainability"])


class AttentionRead(BaseModel):
    name: str
    title: str
    count: int
    oldest_at: datetime | None
    oldest_age_s: float | None
    severity: Literal["ok", "warning", "critical"]
    path: str
    system: str | None


class DashboardRead(BaseModel):
    generated_at: datetime
    items: list[AttentionRead]
    rates: dict[str, Any]


@router.get("/dashboard", dependencies=[VIEWER], response_model=DashboardRead,
            summary="What needs attention now: each item with a count, the oldest item's age, "
            "a severity and the API path that lists it")
async def dashboard(database: DatabaseDep, settings: SettingsDep, now: NowDep) -> Any:
    async with database.read() as session:
        items = await attention(session, now=now,
                                stale_partial_after_s=settings.stale_partial_after_s,
                                worker_lost_after_s=settings.worker_lost_after_s,
                                consumer_lost_after_s=settings.consumer_lost_after_s,
                                consumer_backlog_alert_s=settings.consumer_backlog_alert_s)
        figures = await rates(session, now=now)
    return DashboardRead(generated_at=now,
                         items=[AttentionRead(**item.__dict__) for item in items],
                         rates=figures)
