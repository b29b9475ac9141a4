"""GET /api/v1/reports and /api/v1/reports/{name}: JSON by default, CSV with format=csv."""

from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field

from pipeline_console.api.dependencies import DatabaseDep, NowDep
from pipeline_console.api.problems import problem_responses
from pipeline_console.auth.dependencies import VIEWER
from pipeline_console.errors import FieldError, InvalidInput, NotFound
from pipeline_console.ingestion.schemas import UtcDatetime
from pipeline_console.reports.service import REPORTS, Report

router = APIRouter(tags=["reports"])

DEFAULT_RANGE = timedelta(hours=24)
CSV_MEDIA_TYPE = "text/csv; charset=utf-8"


class ReportRead(BaseModel):
    name: str
    title: str
    start: datetime = Field(serialization_alias="from")
    end: datetime = Field(serialization_alias="to")
    columns: list[str]
    rows: list[dict[str, Any]]
    totals: dict[str, Any]


class ReportList(BaseModel):
    items: list[str]


@router.get("/reports", dependencies=[VIEWER],
            response_model=ReportList, summary="The names of the reports")
async def list_reports() -> ReportList:
    return ReportList(items=list(REPORTS))


@router.get(
    "/reports/{name}", dependencies=[VIEWER],
    response_model=ReportRead, response_model_by_alias=True,
    responses={**problem_responses(404),
               200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                     "description": "The report; CSV (with a filename) when format=csv"}},
    summary="A report over [from, to): ingestion, delivery, anomalies or replays",
    description="`from` and `to` are ISO 8601 with a time zone; the default range is the 24 "
    "hours up to now. `format=csv` answers the same rows as `text/csv` with a filename.")
async def get_report(
    name: str, database: DatabaseDep, now: NowDep,
    start: Annotated[UtcDatetime | None, Query(alias="from")] = None,
    end: Annotated[UtcDatetime | None, Query(alias="to")] = None,
    format: Literal["json", "csv"] = "json",
) -> Any:
    build = REPORTS.get(name)
    if build is None:
        raise NotFound(f"no report is named {name!r}; reports: {', '.join(REPORTS)}")
    start, end = report_range(start, end, now)
    async with database.read() as session:
        report = await build(session, start, end)
    if format == "csv":
        return Response(to_csv(report), media_type=CSV_MEDIA_TYPE,
                        headers={"Content-Disposition":
                                 f'attachment; filename="{csv_filename(report)}"'})
    return ReportRead(**report.__dict__)


def report_range(start: datetime | None, end: datetime | None,
                 now: datetime) -> tuple[datetime, datetime]:
    """[from, to): `to` defaults to now, `from` to 24 hours before `to`; never empty."""
    end = end or now
    try:
        start = start or end - DEFAULT_RANGE
    except OverflowError as error:
        raise InvalidInput("give `from`: 24 hours before `to` is not a representable time",
                           [FieldError("from", "required with so early a `to`",
                                       "query")]) from error
    if start >= end:
        raise InvalidInput("the range is empty: `from` must be before `to`",
                           [FieldError("from", f"{start.isoformat()} is not before "
                                       f"{end.isoformat()}", "query")])
    return start, end


def csv_filename(report: Report) -> str:
    return f"{report.name}-report_{report.start:%Y%m%dT%H%M%SZ}_{report.end:%Y%m%dT%H%M%SZ}.csv"


# OWASP's CSV injection rule: a cell must not start a formula. Spreadsheets skip leading
# blanks before reading one, and where ";" is the list separator a leading ";" ends an empty
# cell and the rest starts a new one: so what counts is the first character after those.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_SKIPPED_BEFORE_A_FORMULA = " \t\r\n\x0b\x0c;"


def csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict):
        value = "; ".join(f"{key}={count}" for key, count in value.items())
    if isinstance(value, str) and (
        value[:1] in _FORMULA_STARTS
        # every ';' may end a cell where it is the list separator: 'x;=cmd' is two cells
        or any(part.lstrip(_SKIPPED_BEFORE_A_FORMULA)[:1] in _FORMULA_STARTS
               for part in value.split(";"))
    ):
        # A source system's name is untrusted: never let a spreadsheet run it as a formula.
        # Text that looks like a negative number ("-2") is neutralised too: it is a name here,
        # and the apostrophe keeps it text. Numbers (counts, latencies) are never strings.
        return "'" + value
    return value


def to_csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(report.columns)
    for row in report.rows:
        writer.writerow([csv_cell(row[column]) for column in report.columns])
    return out.getvalue()
