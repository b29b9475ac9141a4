"""Reading records: state, production, staging, correlations and the ingestion attempt log."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.errors import NotFound
from pipeline_console.models import (
    Correlation,
    IngestionAttempt,
    ProductionRecord,
    RecordState,
    StagingRecord,
)
from pipeline_console.pagination import Page, PageRequest, fetch_page


@dataclass(frozen=True)
class RecordView:
    state: RecordState
    production: ProductionRecord | None
    staging: StagingRecord | None  # the newest staged row of the key


async def list_records(
    session: AsyncSession, page: PageRequest, *, entity_type: str | None = None,
    source_system: str | None = None,
) -> Page[RecordView]:
    result = await fetch_page(
        session, RecordState.idempotency_key, page,
        equal=[(RecordState.entity_type, entity_type),
               (RecordState.source_system, source_system)],
    )
    return Page(await _views(session, result.items), result.next_cursor)


async def get_record(session: AsyncSession, key: str) -> RecordView:
    state = await session.get(RecordState, key)
    if state is None:
        raise NotFound(f"no record has the key {key!r}")
    [view] = await _views(session, [state])
    return view


async def _views(session: AsyncSession, states: list[RecordState]) -> list[RecordView]:
    keys = [state.idempotency_key for state in states]
    if not keys:
        return []
    production = {
        row.idempotency_key: row
        for row in (
            await session.execute(
                select(ProductionRecord).where(ProductionRecord.idempotency_key.in_(keys))
            )
        ).scalars()
    }
    newest = (
        select(func.max(StagingRecord.id))
        .where(StagingRecord.idempotency_key.in_(keys))
        .group_by(StagingRecord.idempotency_key)
    )
    staging = {
        row.idempotency_key: row
        for row in (
            await session.execute(select(StagingRecord).where(StagingRecord.id.in_(newest)))
        ).scalars()
    }
    return [
        RecordView(state, production.get(state.idempotency_key),
                   staging.get(state.idempotency_key))
        for state in states
    ]


async def list_staging(
    session: AsyncSession, page: PageRequest, *, status: str | tuple[str, ...] | None = None,
    entity_type: str | None = None, key: str | None = None,
    staged_before: datetime | None = None,
) -> Page[StagingRecord]:
    return await fetch_page(
        session, StagingRecord.id, page,
        equal=[(StagingRecord.status, status), (StagingRecord.entity_type, entity_type),
               (StagingRecord.idempotency_key, key)],
        where=[StagingRecord.staged_at < staged_before] if staged_before is not None else [],
    )


@dataclass(frozen=True)
class CorrelatedRecord:
    link: Correlation
    view: RecordView


async def get_correlation(
    session: AsyncSession, correlation_id: str, page: PageRequest
) -> Page[CorrelatedRecord]:
    result = await fetch_page(session, Correlation.id, page,
                              equal=[(Correlation.correlation_id, correlation_id)])
    links = result.items
    if not links and page.after is None:
        raise NotFound(f"no record belongs to the correlation id {correlation_id!r}")
    states = {
        state.idempotency_key: state
        for state in (
            await session.execute(
                select(RecordState).where(
                    RecordState.idempotency_key.in_([link.idempotency_key for link in links])
                )
            )
        ).scalars()
    }
    views = {
        view.state.idempotency_key: view
        for view in await _views(session, list(states.values()))
    }
    return Page(
        [CorrelatedRecord(link, views[link.idempotency_key]) for link in result.items],
        result.next_cursor,
    )


async def list_attempts(
    session: AsyncSession, page: PageRequest, *, key: str | None = None,
    decision: str | None = None, source_system: str | None = None,
    message_id: str | None = None,
) -> Page[IngestionAttempt]:
    return await fetch_page(
        session, IngestionAttempt.id, page,
        equal=[(IngestionAttempt.idempotency_key, key), (IngestionAttempt.decision, decision),
               (IngestionAttempt.source_system, source_system),
               (IngestionAttempt.message_id, message_id)],
    )
