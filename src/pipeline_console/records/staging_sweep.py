"""Two jobs over staging. promote_staging re-checks staged records that are not yet promoted
(for example after an entity type's schema changed) and promotes those that are now complete.
stale_partial_sweep marks partial records that have waited too long."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.entity_types.completeness import missing_fields
from pipeline_console.models import EntityType, ProductionRecord, RecordState, StagingRecord
from pipeline_console.records.promotion import production_row, write_production


@dataclass(frozen=True)
class SweepReport:
    checked: int
    promoted: int
    still_partial: int
    remaining: bool  # more rows were waiting than one run takes

    def as_dict(self) -> dict[str, int | bool]:
        return self.__dict__.copy()


async def promote_staging(
    session: AsyncSession, *, now: datetime, actor: str, limit: int = 2000
) -> SweepReport:
    waiting = select(StagingRecord.idempotency_key).where(
        StagingRecord.status.in_(("partial", "complete"))
    ).order_by(StagingRecord.id).limit(limit + 1)
    keys = sorted(set((await session.execute(waiting)).scalars()))
    if not keys:
        return SweepReport(0, 0, 0, False)
    # Lock the keys (sorted, like ingestion), then read their waiting rows again: ingestion
    # may have superseded some between the two statements.
    await session.execute(
        select(RecordState.idempotency_key)
        .where(RecordState.idempotency_key.in_(keys))
        .order_by(RecordState.idempotency_key)
        .with_for_update()
    )
    rows = list(
        (
            await session.execute(
                select(StagingRecord)
                .where(StagingRecord.idempotency_key.in_(keys),
                       StagingRecord.status.in_(("partial", "complete")))
                .order_by(StagingRecord.id)
                .execution_options(populate_existing=True)
            )
        ).scalars()
    )
    schemas = dict(
        (await session.execute(
            select(EntityType.name, EntityType.json_schema).where(
                EntityType.name.in_({row.entity_type for row in rows}))
        )).all()
    )
    production = dict(
        (await session.execute(
            select(ProductionRecord.idempotency_key, ProductionRecord.version).where(
                ProductionRecord.idempotency_key.in_(keys))
        )).all()
    )
    changes, promotions, audit = [], [], []
    for row in rows:
        missing = missing_fields(schemas.get(row.entity_type), row.payload)
        if missing:
            status = "partial"
        elif _may_promote(row, production.get(row.idempotency_key)):
            status = "promoted"
            production[row.idempotency_key] = row.version
            promotions.append(row)
        else:
            status = "complete"
        changes.append({"row_id": row.id, "status": status, "missing": missing or None,
                        "promoted_at": now if status == "promoted" else None})
    if changes:
        table = StagingRecord.__table__
        await session.execute(
            update(table)
            .where(table.c.id == bindparam("row_id"))
            .values(status=bindparam("status"), validation_errors=bindparam("missing"),
                    promoted_at=bindparam("promoted_at"), updated_at=now),
            changes,
        )
    for same_version in (False, True):
        await write_production(
            session,
            [production_row(row, now) for row in promotions
             if (row.anomaly_id is not None) == same_version],
            allow_same_version=same_version,
        )
    for row in promotions:
        audit.append(
            AuditEntry(
                "record.promoted", "record", row.idempotency_key,
                {"version": row.version, "source_system": row.source_system,
                 "by": "promote_staging"},
                row.idempotency_key,
            )
        )
    await append_audit(session, audit, actor=actor, now=now)
    return SweepReport(
        checked=len(rows),
        promoted=len(promotions),
        still_partial=sum(1 for change in changes if change["status"] == "partial"),
        remaining=len(keys) > limit,
    )


def _may_promote(row: StagingRecord, production_version: int | None) -> bool:
    """Above production's version; or, for the payload an operator accepted in an anomaly
    resolution, at the same version (it replaces the payload it was preferred to)."""
    if production_version is None or row.version > production_version:
        return True
    return row.anomaly_id is not None and row.version == production_version



@dataclass(frozen=True)
class StaleReport:
    newly_stale: int
    stale_total: int
    oldest_staged_at: datetime | None
    remaining: bool  # more newly stale rows were waiting than one run takes

    def as_dict(self) -> dict[str, object]:
        return {"newly_stale": self.newly_stale, "stale_total": self.stale_total,
                "oldest_staged_at": self.oldest_staged_at.isoformat()
                if self.oldest_staged_at else None, "remaining": self.remaining}


async def sweep_stale_partials(
    session: AsyncSession, *, now: datetime, actor: str, stale_after_s: float,
    limit: int = 2000,
) -> StaleReport:
    """Mark partial records that have waited longer than `stale_after_s` as stale, once each,
    with an audit event naming what they still miss. Nothing is deleted or changed otherwise:
    a newer version can still complete them, and the dashboard lists them."""
    before = now - timedelta(seconds=stale_after_s)
    rows = list((await session.execute(
        select(StagingRecord)
        .where(StagingRecord.status == "partial", StagingRecord.staged_at < before,
               StagingRecord.stale_since.is_(None))
        .order_by(StagingRecord.id).limit(limit + 1).with_for_update(skip_locked=True)
    )).scalars())
    remaining = len(rows) > limit
    rows = rows[:limit]
    audit = []
    for row in rows:
        row.stale_since = now
        missing = [str(error.get("message") or error.get("path") or "?")
                   for error in row.validation_errors or []]
        audit.append(AuditEntry(
            "record.partial_stale", "record", row.idempotency_key,
            {"version": row.version, "source_system": row.source_system,
             "waiting_s": round((now - row.staged_at).total_seconds()),
             "missing": "; ".join(missing) or "unknown"},
            row.idempotency_key))
    await session.flush()
    await append_audit(session, audit, actor=actor, now=now)
    stale_total, oldest = (await session.execute(
        select(func.count(), func.min(StagingRecord.staged_at))
        .where(StagingRecord.status == "partial", StagingRecord.staged_at < before))).one()
    return StaleReport(len(rows), stale_total, oldest, remaining)
