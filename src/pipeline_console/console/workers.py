"""The workers page: which worker processes run, which were lost, what each holds."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from pipeline_console.api.dependencies import DatabaseDep, KeyPage, NowDep, SettingsDep
from pipeline_console.api.filters import parse_statuses
from pipeline_console.console.auth import CONSOLE_VIEWER
from pipeline_console.console.templating import page
from pipeline_console.delivery.workers import list_workers
from pipeline_console.delivery.workers_api import WORKER_STATUS_WORDS
from pipeline_console.ingestion.schemas import UtcDatetime

router = APIRouter(include_in_schema=False)


@router.get("/workers", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def workers(request: Request, database: DatabaseDep, page_request: KeyPage, now: NowDep,
                  settings: SettingsDep,
                  status: Annotated[str | None, Query(max_length=100)] = None,
                  seen_from: Annotated[UtcDatetime | None, Query(alias="from")] = None,
                  ) -> Response:
    # the form's "any" sends status=; "all" as on the other console lists
    wanted = (None if status in (None, "", "all")
              else parse_statuses(status, WORKER_STATUS_WORDS))
    async with database.read() as session:
        items, cursor = await list_workers(session, page_request, now=now,
                                           lost_after_s=settings.worker_lost_after_s,
                                           status=set(wanted or ()), seen_from=seen_from)
    return page(request, "workers.html", title="Workers", nav="/workers", workers=items,
                next_cursor=cursor, status=",".join(wanted or ()), choices=WORKER_STATUS_WORDS,
                seen_from=seen_from,
                lost_after_s=settings.worker_lost_after_s)
