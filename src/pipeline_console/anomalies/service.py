"""Listing and resolving anomalies.

Later messages for a key with an open anomaly are decided by the ordinary table: a newer
version is accepted (a source system's progress is never frozen by an old conflict), a
duplicate of the current payload is skipped, and a repeat of the same conflicting payload
joins the open anomaly instead of opening another. `accept_incoming` is therefore only
possible while the anomaly's version is still the current one; otherwise only
`keep_current` can close it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.entity_types.completeness import missing_fields
from pipeline_console.errors import Conflict, NotFound
from pipeline_console.models import (
    Anomaly,
    EntityType,
    ProductionRecord,
    RecordState,
    StagingRecord,
)
from pipeline_console.pagination import Page, PageRequest, fetch_page
from pipeline_console.records.promotion import production_row, write_production

RESOLUTIONS = ("accept_incoming", "keep_current")


async def list_anomalies(
    session: AsyncSession, page: PageRequest, *, status: str | tuple[str, ...] | None = None,
    key: str | None = None,
) -> Page[Anomaly]:
    return await fetch_page(session, Anomaly.id, page,
                            equal=[(Anomaly.status, status), (Anomaly.idempotency_key, key)])


async def get_anomaly(session: AsyncSession, anomaly_id: int) -> Anomaly:
    anomaly = await session.get(Anomaly, anomaly_id)
    if anomaly is None:
        raise NotFound(f"anomaly {anomaly_id} does not exist")
    return anomaly


async def resolve_anomaly(
    session: AsyncSession,
    anomaly_id: int,
    resolution: str,
    note: str,
    *,
    actor: str,
    now: datetime,
) -> Anomaly:
    found = await get_anomaly(session, anomaly_id)
    key = found.idempotency_key
    # Lock order is the same as ingestion's: the key's state row first, then the rest.
    state = (
        await session.execute(
            select(RecordState).where(RecordState.idempotency_key == key).with_for_update()
        )
    ).scalar_one()
    anomaly = (
        await session.execute(
            select(Anomaly).where(Anomaly.id == anomaly_id).with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one()
    if anomaly.status != "open":
        raise Conflict(
            f"anomaly {anomaly_id} was already resolved ({anomaly.resolution}) by "
            f"{anomaly.resolved_by} at {anomaly.resolved_at:%Y-%m-%d %H:%M:%S} UTC"
        )
    audit = []
    if resolution == "accept_incoming":
        if state.current_version != anomaly.version:
            raise Conflict(
                f"version {anomaly.version} is no longer current: version "
                f"{state.current_version} from {state.source_system} was accepted since; "
                "only keep_current can resolve this anomaly"
            )
        if state.payload_hash != anomaly.current_payload_hash:
            raise Conflict(
                f"the current payload of version {anomaly.version} changed since this anomaly "
                "opened (another resolution accepted a different payload); "
                "only keep_current can resolve this anomaly"
            )
        audit.extend(await _make_incoming_current(session, anomaly, state, now))
    anomaly.status = "resolved"
    anomaly.resolution = resolution
    anomaly.resolution_note = note
    anomaly.resolved_by = actor
    anomaly.resolved_at = now
    await session.flush()
    audit.insert(
        0,
        AuditEntry(
            "anomaly.resolved", "anomaly", str(anomaly.id),
            {"resolution": resolution, "note": note, "version": anomaly.version}, key,
        ),
    )
    await append_audit(session, audit, actor=actor, now=now)
    return anomaly


async def _make_incoming_current(
    session: AsyncSession, anomaly: Anomaly, state: RecordState, now: datetime
) -> list[AuditEntry]:
    """Stage the quarantined payload as the key's current version (and promote it if complete)."""
    key = anomaly.idempotency_key
    schema = await session.scalar(
        select(EntityType.json_schema).where(EntityType.name == state.entity_type)
    )
    missing = missing_fields(schema, anomaly.incoming_payload)
    production_version = await session.scalar(
        select(ProductionRecord.version).where(ProductionRecord.idempotency_key == key)
    )
    promote = not missing and (production_version is None or production_version <= anomaly.version)
    status = "promoted" if promote else ("partial" if missing else "complete")
    await session.execute(
        update(StagingRecord)
        .where(
            StagingRecord.idempotency_key == key,
            StagingRecord.status.in_(("partial", "complete")),
        )
        .values(status="superseded", updated_at=now)
    )
    staged = StagingRecord(
        idempotency_key=key,
        entity_type=state.entity_type,
        entity_id=state.entity_id,
        version=anomaly.version,
        source_system=anomaly.incoming_source_system,
        payload=anomaly.incoming_payload,
        payload_hash=anomaly.incoming_payload_hash,
        status=status,
        validation_errors=missing or None,
        anomaly_id=anomaly.id,
        staged_at=now,
        updated_at=now,
        promoted_at=now if promote else None,
    )
    session.add(staged)
    await session.flush()
    state.payload_hash = anomaly.incoming_payload_hash
    state.source_system = anomaly.incoming_source_system
    state.updated_at = now
    details = {"version": anomaly.version, "source_system": anomaly.incoming_source_system,
               "anomaly_id": anomaly.id}
    audit = [AuditEntry("record.accepted", "record", key,
                        {**details, "decision": "accept_incoming", "staging_status": status}, key)]
    if promote:
        await write_production(
            session,
            [production_row(staged, now)],
            allow_same_version=True,
        )
        audit.append(AuditEntry("record.promoted", "record", key, details, key))
    return audit
