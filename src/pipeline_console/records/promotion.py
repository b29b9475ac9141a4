"""Writing the production projection: shared by ingestion, the promote_staging job and
anomaly resolution. The version guard is in the statement itself, so production never
goes down even if a caller is wrong."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.db import insert_for
from pipeline_console.delivery.outbox import enqueue_deliveries
from pipeline_console.models import ProductionRecord, StagingRecord

_table = ProductionRecord.__table__


async def write_production(
    session: AsyncSession, rows: Sequence[dict[str, Any]], *, allow_same_version: bool = False
) -> None:
    """Upsert production rows; an existing row is replaced only by a higher version
    (or, for an operator's anomaly resolution, by the same version). Every row written
    queues one delivery per subscribed downstream system."""
    if not rows:
        return
    insert = insert_for(session.bind.dialect.name)
    statement = insert(_table)
    guard = (
        _table.c.version <= statement.excluded.version
        if allow_same_version
        else _table.c.version < statement.excluded.version
    )
    statement = statement.on_conflict_do_update(
        index_elements=[_table.c.idempotency_key],
        set_={
            column: statement.excluded[column]
            for column in (
                "entity_type", "entity_id", "version", "payload", "payload_hash",
                "source_system", "correlation_id", "staging_id", "promoted_at",
            )
        },
        where=guard,
    )
    # Only rows the guard let through were written; exactly those get deliveries queued,
    # in this same transaction (the transactional outbox).
    written = await session.execute(
        statement.returning(_table.c.idempotency_key, _table.c.version), list(rows)
    )
    promoted = {(row.idempotency_key, row.version) for row in written}
    await enqueue_deliveries(
        session,
        [row for row in rows if (row["idempotency_key"], row["version"]) in promoted],
        rows[0]["promoted_at"],
    )


def production_row(row: StagingRecord, now: datetime) -> dict[str, object]:
    """The production row that promoting a staged row writes."""
    return {
        "idempotency_key": row.idempotency_key,
        "entity_type": row.entity_type,
        "entity_id": row.entity_id,
        "version": row.version,
        "payload": row.payload,
        "payload_hash": row.payload_hash,
        "source_system": row.source_system,
        "correlation_id": row.correlation_id,
        "staging_id": row.id,
        "promoted_at": now,
    }
