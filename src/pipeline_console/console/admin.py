"""Console pages around the queues: deliveries, staging, reports, jobs, the audit
log. Reads call the same services (or the same page helper) as the API; "run now" runs a job
through run_job, like the API, the CLI and the worker."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select

from pipeline_console.api.dependencies import (
    ActorDep,
    DatabaseDep,
    IdPage,
    NowDep,
    SettingsDep,
)
from pipeline_console.api.filters import DELIVERY_STATUS_WORDS, STAGING_STATUS_WORDS
from pipeline_console.console.auth import CONSOLE_OPERATOR, CONSOLE_VIEWER
from pipeline_console.console.forms import listed
from pipeline_console.console.templating import done, error_page, page
from pipeline_console.dashboard.service import BACKLOG
from pipeline_console.delivery.api import DelivererDep
from pipeline_console.errors import DomainError
from pipeline_console.ingestion.schemas import UtcDatetime
from pipeline_console.jobs.registry import JOBS, run_job
from pipeline_console.models import AuditEvent, Delivery, JobRun
from pipeline_console.pagination import encode_cursor, fetch_page
from pipeline_console.records.service import list_staging
from pipeline_console.redaction import shown
from pipeline_console.reports.api import report_range
from pipeline_console.reports.service import REPORTS

router = APIRouter(include_in_schema=False)
Text = Annotated[str | None, Query(max_length=200)]
Filter = Annotated[str, Query(max_length=200)]


@router.get("/deliveries", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def deliveries(request: Request, database: DatabaseDep, page_request: IdPage,
                     system: Text = None, status: Filter = "all") -> Response:
    status, statuses = listed(status, DELIVERY_STATUS_WORDS)
    async with database.read() as session:
        found = await fetch_page(
            session, Delivery.id, page_request,
            equal=[(Delivery.system, system or None), (Delivery.status, statuses)])
    return page(request, "deliveries.html", title="Deliveries", nav="/systems",
                deliveries=found.items, next_cursor=found.next_cursor, system=system or "",
                status=status, choices=["all", ",".join(BACKLOG), *DELIVERY_STATUS_WORDS])


@router.get("/staging", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def staging(request: Request, database: DatabaseDep, page_request: IdPage,
                  settings: SettingsDep, now: NowDep, status: Filter = "partial",
                  stale: Literal["yes", "no"] = "no",
                  staged_before: UtcDatetime | None = None) -> Response:
    """`stale=yes`: waiting longer than STALE_PARTIAL_AFTER_S now; `staged_before`: staged
    before that time (the dashboard's card links with the time its count used)."""
    status, statuses = listed(status, STAGING_STATUS_WORDS)
    stale_before = now - timedelta(seconds=settings.stale_partial_after_s)
    before = [bound for bound in (stale_before if stale == "yes" else None, staged_before)
              if bound is not None]
    async with database.read() as session:
        found = await list_staging(session, page_request, status=statuses,
                                   staged_before=min(before) if before else None)
    return page(request, "staging.html", title="Staging", nav="/staging", rows=found.items,
                next_cursor=found.next_cursor, status=status, stale_before=stale_before,
                stale=stale, staged_before=staged_before,
                choices=[*STAGING_STATUS_WORDS, "all"])


@router.get("/reports", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def reports(request: Request, database: DatabaseDep, now: NowDep,
                  name: Literal["ingestion", "delivery", "anomalies", "replays"] = "ingestion",
                  start: Annotated[UtcDatetime | None, Query(alias="from")] = None,
                  end: Annotated[UtcDatetime | None, Query(alias="to")] = None) -> Response:
    try:
        start, end = report_range(start, end, now)
    except DomainError as error:
        return error_page(request, error)
    async with database.read() as session:
        report = await REPORTS[name](session, start, end)
    return page(request, "reports.html", title="Reports", nav="/reports", report=report,
                names=list(REPORTS), start=start, end=end,
                csv=f"/api/v1/reports/{name}?" + urlencode(
                    {"from": start.isoformat(), "to": end.isoformat(), "format": "csv"}))


@router.get("/jobs", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def jobs(request: Request, database: DatabaseDep, page_request: IdPage,
               job: Text = None) -> Response:
    async with database.read() as session:
        runs = list((await session.execute(
            select(JobRun).where(*([JobRun.job == job] if job else []))
            .where(*([JobRun.id < page_request.after] if page_request.after else []))
            .order_by(JobRun.id.desc()).limit(page_request.limit + 1))).scalars())
    older = (encode_cursor(runs[page_request.limit - 1].id)
             if len(runs) > page_request.limit else None)
    return page(request, "jobs.html", title="Jobs", nav="/jobs", jobs=list(JOBS.values()),
                runs=runs[:page_request.limit], older=older, job=job or "")


@router.post("/jobs/{name}/run", dependencies=[CONSOLE_OPERATOR])
async def run_now(request: Request, name: str, deliverer: DelivererDep, settings: SettingsDep,
                  actor: ActorDep) -> Response:
    try:
        record = await run_job(deliverer, settings, name, actor=actor.label, trigger="api")
    except DomainError as error:
        return error_page(request, error)
    outcome = record.error if record.error else record.result
    return done(request, "/jobs", f"Job {name} (run {record.id}) {record.status}: {outcome}")


@router.get("/audit", response_class=HTMLResponse, dependencies=[CONSOLE_VIEWER])
async def audit(request: Request, database: DatabaseDep, page_request: IdPage,
                action: Text = None, actor: Text = None, subject: Text = None) -> Response:
    """The audit log, newest first."""
    conditions = [AuditEvent.action == action] if action else []
    conditions += [AuditEvent.actor == actor] if actor else []
    conditions += [AuditEvent.subject_type == subject] if subject else []
    if page_request.after:
        conditions.append(AuditEvent.id < page_request.after)
    async with database.read() as session:
        events = list((await session.execute(
            select(AuditEvent).where(*conditions).order_by(AuditEvent.id.desc())
            .limit(page_request.limit + 1))).scalars())
    older = (encode_cursor(events[page_request.limit - 1].id)
             if len(events) > page_request.limit else None)
    return page(request, "audit.html", title="Audit log", nav="/audit",
                events=[shown(event, "details") for event in events[:page_request.limit]],
                older=older, action=action or "",
                actor=actor or "", subject=subject or "")

