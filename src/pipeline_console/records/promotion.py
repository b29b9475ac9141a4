"""Writing the production projection: shared by ingestion, the promote_staging job and
anomaly resolution. The version guard is in the statement itself, so production never
goes down even if a caller is wrong."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.db import Column, Stored, insert_columns, insert_returning
from pipeline_console.delivery.outbox import enqueue_deliveries
from pipeline_console.models import ProductionRecord, StagingRecord

_table = ProductionRecord.__table__


_COLUMNS = ("entity_type", "entity_id", "version", "payload", "payload_hash", "source_system",
            "correlation_id", "staging_id", "promoted_at")


async def write_production(
    session: AsyncSession, rows: Sequence[dict[str, Any]], *, allow_same_version: bool = False,
    stored_payloads: Sequence[Any] | None = None, new_keys: Collection[str] = (),
) -> None:
    """Upsert production rows; an existing row is replaced only by a higher version
    (or, for an operator's anomaly resolution, by the same version). Every row written
    queues one delivery per subscribed downstream system.

    `stored_payloads`: the rows' payloads already serialized (db.stored_form), when the
    caller has them. `new_keys`: keys whose state this transaction created, so that no
    production row can exist for them; theirs are plain inserts (one executemany, no
    RETURNING to read), which fail loudly rather than overwrite if one did exist."""
    if not rows:
        return
    fresh: list[int] = []
    existing: list[int] = []
    for index, row in enumerate(rows):
        (fresh if row["idempotency_key"] in new_keys else existing).append(index)

    def columns(indices: list[int]) -> dict[str, Column]:
        chosen = [rows[i] for i in indices]
        out: dict[str, Column] = {
            name: [row[name] for row in chosen] for name in ("idempotency_key", *_COLUMNS)}
        if stored_payloads is not None:
            out["payload"] = Stored([stored_payloads[i] for i in indices])
        return out

    if fresh:
        await insert_columns(session, _table, columns(fresh))
    written = {(rows[i]["idempotency_key"], rows[i]["version"]) for i in fresh}
    if existing:
        guard = "<=" if allow_same_version else "<"
        # Only rows the guard let through were written; exactly those get deliveries queued,
        # in this same transaction (the transactional outbox).
        written.update(tuple(row) for row in await insert_returning(
            session, _table, columns(existing),
            conflict=(
                "ON CONFLICT (idempotency_key) DO UPDATE SET "
                + ", ".join(f"{column} = excluded.{column}" for column in _COLUMNS)
                + f" WHERE production_records.version {guard} excluded.version"
            ),
            returning=["idempotency_key", "version"],
        ))
    await enqueue_deliveries(
        session,
        [row for row in rows if (row["idempotency_key"], row["version"]) in written],
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
