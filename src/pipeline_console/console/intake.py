"""The intake page: which broker consumers run, which were lost, what each has taken from its
broker and how far behind the broker says it is."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from pipeline_console.api.dependencies import DatabaseDep, KeyPage, NowDep, SettingsDep
from pipeline_console.api.filters import parse_statuses
from pipeline_console.console.auth import CONSOLE_VIEWER
from pipeline_console.console.templating import page
from pipeline_console.consumers.api import CONSUMER_KINDS, CONSUMER_STATUS_WORDS
from pipeline_console.consumers.registry import list_consumers
from pipeline_console.ingestion.schemas import UtcDatetime

router = APIRouter(include_in_schema=False)

ANY = (None, "", "all")  # the form's "any" sends "all"; an empty value means the same


@router.get("/intake", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def intake(request: Request, database: DatabaseDep, page_request: KeyPage, now: NowDep,
                 settings: SettingsDep,
                 status: Annotated[str | None, Query(max_length=100)] = None,
                 kind: Annotated[str | None, Query(max_length=100)] = None,
                 seen_from: Annotated[UtcDatetime | None, Query(alias="from")] = None,
                 backlog_growing_before: UtcDatetime | None = None) -> Response:
    wanted = None if status in ANY else parse_statuses(status, CONSUMER_STATUS_WORDS)
    kinds = () if kind in ANY else parse_statuses(kind, CONSUMER_KINDS, name="kind")
    kind_wanted = kinds[0] if len(kinds) == 1 else None  # both kinds: no filter
    async with database.read() as session:
        items, cursor = await list_consumers(
            session, page_request, now=now, lost_after_s=settings.consumer_lost_after_s,
            status=set(wanted or ()), kind=kind_wanted, seen_from=seen_from,
            backlog_growing_before=backlog_growing_before)
    return page(request, "intake.html", title="Intake", nav="/intake", consumers=items,
                next_cursor=cursor, status=",".join(wanted or ()), kind=kind_wanted or "",
                statuses=CONSUMER_STATUS_WORDS, kinds=CONSUMER_KINDS, seen_from=seen_from,
                backlog_growing_before=backlog_growing_before, now=now,
                lost_after_s=settings.consumer_lost_after_s,
                backlog_alert_s=settings.consumer_backlog_alert_s)
