"""Records, staging, correlations and the ingestion attempt log."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query

from pipeline_console.api.dependencies import DatabaseDep, IdPage, KeyPage
from pipeline_console.api.filters import STAGING_STATUS_WORDS, Statuses, status_filter
from pipeline_console.api.problems import problem_responses
from pipeline_console.auth.dependencies import VIEWER
from pipeline_console.ingestion.schemas import UtcDatetime
from pipeline_console.records import service
from pipeline_console.records.schemas import (
    AttemptPage,
    CorrelatedRecordRead,
    CorrelationRead,
    ProductionRead,
    RecordPage,
    RecordRead,
    StagingPage,
    StagingRead,
)

router = APIRouter(tags=["records"])

AttemptDecision = Literal[
    "accept_new", "accept_supersede", "skip_duplicate", "quarantine", "skip_stale", "rejected"
]


def record_read(view: service.RecordView) -> RecordRead:
    state = view.state
    return RecordRead(
        idempotency_key=state.idempotency_key,
        entity_type=state.entity_type,
        entity_id=state.entity_id,
        current_version=state.current_version,
        payload_hash=state.payload_hash,
        source_system=state.source_system,
        first_seen_at=state.first_seen_at,
        updated_at=state.updated_at,
        production=ProductionRead.model_validate(view.production) if view.production else None,
        staging=StagingRead.model_validate(view.staging) if view.staging else None,
    )


@router.get("/records", dependencies=[VIEWER],
            response_model=RecordPage, responses=problem_responses(422),
            summary="List records (ordered by key)")
async def list_records(
    database: DatabaseDep,
    page: KeyPage,
    entity_type: Annotated[str | None, Query(max_length=64)] = None,
    source_system: Annotated[str | None, Query(max_length=64,
                                               description="source of the current version")] = None,
) -> RecordPage:
    async with database.read() as session:
        result = await service.list_records(session, page, entity_type=entity_type,
                                            source_system=source_system)
        return RecordPage(items=[record_read(view) for view in result.items],
                          next_cursor=result.next_cursor)


@router.get("/records/{key:path}", dependencies=[VIEWER],
            response_model=RecordRead, responses=problem_responses(404),
            summary="One record: its state, production row and newest staged row")
async def get_record(
    database: DatabaseDep,
    key: Annotated[str, Path(description="{entity_type}:{entity_id}, URL-encoded")],
) -> RecordRead:
    async with database.read() as session:
        return record_read(await service.get_record(session, key))


@router.get("/staging", dependencies=[VIEWER],
            response_model=StagingPage, responses=problem_responses(422),
            summary="Staged records, oldest first")
async def list_staging(
    database: DatabaseDep,
    page: IdPage,
    status: Annotated[Statuses | None, status_filter(STAGING_STATUS_WORDS)],
    entity_type: Annotated[str | None, Query(max_length=64)] = None,
    key: Annotated[str | None, Query(max_length=321)] = None,
    staged_before: Annotated[UtcDatetime | None, Query(
        description="only rows staged before this time (the dashboard's partial records "
        "waiting too long)")] = None,
) -> StagingPage:
    async with database.read() as session:
        result = await service.list_staging(session, page, status=status,
                                            entity_type=entity_type, key=key,
                                            staged_before=staged_before)
        return StagingPage(items=[StagingRead.model_validate(row) for row in result.items],
                           next_cursor=result.next_cursor)


@router.get("/correlations/{correlation_id:path}", dependencies=[VIEWER],
            response_model=CorrelationRead,
            responses=problem_responses(404, 422),
            summary="Every record of one business event, across systems")
async def get_correlation(
    database: DatabaseDep, correlation_id: str, page: IdPage
) -> CorrelationRead:
    async with database.read() as session:
        result = await service.get_correlation(session, correlation_id, page)
        records = [
            CorrelatedRecordRead(
                **record_read(item.view).model_dump(),
                linked_by_source_system=item.link.source_system,
                linked_version=item.link.version,
                linked_at=item.link.created_at,
            )
            for item in result.items
        ]
        return CorrelationRead(correlation_id=correlation_id, records=records,
                               next_cursor=result.next_cursor)


@router.get("/attempts", dependencies=[VIEWER],
            response_model=AttemptPage, responses=problem_responses(422),
            summary="The ingestion attempt log, oldest first")
async def list_attempts(
    database: DatabaseDep,
    page: IdPage,
    key: Annotated[str | None, Query(max_length=321)] = None,
    decision: AttemptDecision | None = None,
    source_system: Annotated[str | None, Query(max_length=64)] = None,
    message_id: Annotated[str | None, Query(max_length=256)] = None,
) -> AttemptPage:
    async with database.read() as session:
        result = await service.list_attempts(session, page, key=key, decision=decision,
                                             source_system=source_system, message_id=message_id)
        return AttemptPage.model_validate({"items": result.items,
                                           "next_cursor": result.next_cursor},
                                          from_attributes=True)
