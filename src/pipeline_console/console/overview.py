"""Console pages: the dashboard, search, the record inspector, the business-event view and a
delivery with its attempts. Each calls the same service functions as the API."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from pipeline_console.api.dependencies import DatabaseDep, NowDep, SettingsDep
from pipeline_console.console.auth import CONSOLE_VIEWER
from pipeline_console.console.templating import error_page, page
from pipeline_console.console.views import by_system, console_path, version_changes
from pipeline_console.dashboard.service import attention, hourly_activity, rates
from pipeline_console.errors import DomainError, FieldError, InvalidInput, NotFound
from pipeline_console.inspector.service import find_records, inspect_event, inspect_record
from pipeline_console.models import Delivery, DeliveryAttempt, ReplayExecution
from pipeline_console.pagination import MAX_ID
from pipeline_console.redaction import shown

router = APIRouter(include_in_schema=False)

DECISIONS = ["accept_new", "accept_supersede", "skip_duplicate", "quarantine", "skip_stale",
             "rejected"]
DECISION_COLOURS = ["#1a7f37", "#4ac26b", "#8c959f", "#cf222e", "#bf8700", "#6e40c9"]
OUTCOMES = ["success", "transient", "permanent", "ambiguous", "worker_lost"]
OUTCOME_COLOURS = ["#1a7f37", "#bf8700", "#cf222e", "#6e40c9", "#8c959f"]
INSPECT_LIMIT = 100


@dataclass(frozen=True)
class Chart:
    hours: list[str]
    counts: dict[str, dict[str, int]]


async def _attention(database: Any, settings: Any, now: Any) -> list[Any]:
    async with database.read() as session:
        return await attention(session, now=now,
                               stale_partial_after_s=settings.stale_partial_after_s,
                               worker_lost_after_s=settings.worker_lost_after_s,
                               consumer_lost_after_s=settings.consumer_lost_after_s,
                               consumer_backlog_alert_s=settings.consumer_backlog_alert_s)


@router.get("/", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def dashboard(request: Request, database: DatabaseDep, settings: SettingsDep,
                    now: NowDep) -> Response:
    items = await _attention(database, settings, now)
    async with database.read() as session:
        figures = await rates(session, now=now)
        activity = await hourly_activity(session, now=now)
    return page(request, "dashboard.html", title="Dashboard", nav="/", items=items,
                refresh_s=settings.console_refresh_s,
                console_path=console_path, rates=figures, now=now,
                ingestion=Chart(activity.hours, activity.ingestion),
                delivery=Chart(activity.hours, activity.delivery),
                decisions=DECISIONS, decision_colours=DECISION_COLOURS,
                outcomes=OUTCOMES, outcome_colours=OUTCOME_COLOURS)


@router.get("/fragments/attention", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def attention_fragment(request: Request, database: DatabaseDep, settings: SettingsDep,
                             now: NowDep) -> Response:
    """The dashboard's attention cards alone: the page polls this to refresh itself."""
    items = await _attention(database, settings, now)
    return page(request, "_attention.html", fragment=True, items=items,
                refresh_s=settings.console_refresh_s,
                console_path=console_path, now=now)


@router.get("/search", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def search(request: Request, database: DatabaseDep,
                 q: Annotated[str, Query(max_length=512)] = "") -> Response:
    async with database.read() as session:
        found = await find_records(session, q) if "\x00" not in q else []
    if len(found) == 1:
        return RedirectResponse(f"/records/{_quote(found[0].key)}", status_code=303)
    return page(request, "search.html", title="Find a record", q=q, found=found,
                is_event=any(item.how == "correlation id" for item in found))


@router.get("/records/{key:path}", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def record(request: Request, key: str, database: DatabaseDep) -> Response:
    try:
        async with database.read() as session:
            found = await inspect_record(session, key, limit=INSPECT_LIMIT)
    except DomainError as error:
        return error_page(request, error)
    sections = found.decoded_sections()
    siblings = sorted({(c.correlation_id, c.idempotency_key) for c in sections["correlations"]
                       if c.idempotency_key != key})
    return page(request, "record.html", title=key, key=key, found=found, sections=sections,
                totals=found.totals, limit=INSPECT_LIMIT, siblings=siblings,
                events=sorted({c.correlation_id for c in sections["correlations"]}),
                changes=version_changes(sections["staging"]),
                superseded={event.details["version"]: event.details
                            for event in sections["audit"]
                            if event.action == "record.superseded"},
                systems=by_system(sections["deliveries"], sections["delivery_attempts"]))


@router.get("/events", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def event(request: Request, database: DatabaseDep,
                correlation_id: Annotated[str | None, Query(max_length=256)] = None,
                message_id: Annotated[str | None, Query(max_length=256)] = None) -> Response:
    if (correlation_id is None) == (message_id is None):
        return error_page(request, InvalidInput(
            "give exactly one of correlation_id and message_id",
            [FieldError("correlation_id", "exactly one of the two", "query")]))
    try:
        async with database.read() as session:
            found = await inspect_event(session, correlation_id=correlation_id,
                                        message_id=message_id, limit=INSPECT_LIMIT)
    except DomainError as error:
        return error_page(request, error)
    what = (f"business event {correlation_id}" if correlation_id is not None
            else f"message {message_id}")
    return page(request, "event.html", title=what, what=what, found=found)


@router.get("/deliveries/{delivery_id}", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def delivery(request: Request, delivery_id: int, database: DatabaseDep) -> Response:
    if not 1 <= delivery_id <= MAX_ID:
        return error_page(request, NotFound(f"delivery {delivery_id} does not exist"))
    async with database.read() as session:
        found = await session.get(Delivery, delivery_id)
        if found is None:
            return error_page(request, NotFound(f"delivery {delivery_id} does not exist"))
        tries = list((await session.execute(
            select(DeliveryAttempt).where(DeliveryAttempt.delivery_id == delivery_id)
            .order_by(DeliveryAttempt.id))).scalars())
        executions = {row.delivery_attempt_id: row for row in (await session.execute(
            select(ReplayExecution).where(ReplayExecution.delivery_id == delivery_id)
        )).scalars()}
    return page(request, "delivery.html", title=f"Delivery {delivery_id}", delivery=found,
                attempts=[shown(attempt, "request") for attempt in tries],
                executions=executions)


def _quote(key: str) -> str:
    return quote(key, safe=":")
