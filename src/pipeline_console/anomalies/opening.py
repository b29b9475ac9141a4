"""Opening anomalies for same-version conflicts, called by ingestion inside its transaction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.audit.service import AuditEntry
from pipeline_console.db import allocate_ids, bulk_insert
from pipeline_console.ingestion.diff import field_diff
from pipeline_console.ingestion.planner import IncomingMessage, PlannedQuarantine
from pipeline_console.models import Anomaly, StagingRecord

# Built once, with expanding parameters: a literal IN list (of tuples, above all) is coerced
# element by element on every call.
_OPEN_ANOMALIES = select(
    Anomaly.id, Anomaly.idempotency_key, Anomaly.version,
    Anomaly.current_payload_hash, Anomaly.incoming_payload_hash,
).where(Anomaly.status == "open",
        Anomaly.idempotency_key.in_(bindparam("keys", expanding=True)))
_STORED_PAYLOADS = select(
    StagingRecord.idempotency_key, StagingRecord.version,
    StagingRecord.payload_hash, StagingRecord.payload,
).where(
    # The keys alone first, so both databases reach the rows through the
    # (idempotency_key, version) index: matched on the triples alone, SQLite
    # scanned the whole staging table (8 ms per batch at 20,000 messages).
    StagingRecord.idempotency_key.in_(bindparam("keys", expanding=True)),
    tuple_(
        StagingRecord.idempotency_key, StagingRecord.version, StagingRecord.payload_hash,
    ).in_(bindparam("triples", expanding=True)),
)


async def open_anomalies(
    session: AsyncSession,
    messages: Sequence[IncomingMessage],
    quarantines: Sequence[PlannedQuarantine],
    now: datetime,
    audit: list[AuditEntry],
) -> list[int]:
    """One anomaly per distinct conflict; a repeat of an open conflict joins its anomaly."""
    if not quarantines:
        return []
    keys = sorted({quarantine.key for quarantine in quarantines})
    open_rows = await session.execute(_OPEN_ANOMALIES, {"keys": keys})
    known = {
        (row.idempotency_key, row.version, row.current_payload_hash, row.incoming_payload_hash):
        row.id
        for row in open_rows
    }
    wanted = {
        (q.key, q.current.version, q.current.payload_hash)
        for q in quarantines if q.current_payload is None
    }
    current_payloads: dict[tuple[str, int, str], dict[str, Any]] = {}
    if wanted:
        stored = await session.execute(_STORED_PAYLOADS, {
            "keys": sorted({key for key, _, _ in wanted}), "triples": sorted(wanted)})
        for row in stored:
            current_payloads[(row.idempotency_key, row.version, row.payload_hash)] = row.payload

    new_rows: list[dict[str, Any]] = []
    new_signatures: list[tuple[str, int, str, str]] = []
    for quarantine in quarantines:
        message = messages[quarantine.message_index]
        signature = (quarantine.key, quarantine.version, quarantine.current.payload_hash,
                     message.payload_hash)
        if signature in known or signature in new_signatures:
            continue
        current_payload = quarantine.current_payload
        if current_payload is None:
            current_payload = current_payloads[
                (quarantine.key, quarantine.current.version, quarantine.current.payload_hash)
            ]
        new_signatures.append(signature)
        new_rows.append(
            {
                "idempotency_key": quarantine.key,
                "version": quarantine.version,
                "status": "open",
                "current_payload": current_payload,
                "current_payload_hash": quarantine.current.payload_hash,
                "current_source_system": quarantine.current.source_system,
                "incoming_payload": message.payload,
                "incoming_payload_hash": message.payload_hash,
                "incoming_source_system": message.source_system,
                "incoming_message_id": message.message_id,
                "diff": field_diff(current_payload, message.payload),
                "opened_at": now,
            }
        )
    if new_rows:
        # Ids reserved up front: one statement for the batch (RETURNING would make SQLite
        # insert row by row).
        created = await allocate_ids(session, Anomaly.__table__, len(new_rows))
        await bulk_insert(session, Anomaly.__table__,
                          [{"id": id_, **row} for id_, row in zip(created, new_rows, strict=True)])
        for signature, row, anomaly_id in zip(new_signatures, new_rows, created, strict=True):
            known[signature] = anomaly_id
            audit.append(
                AuditEntry(
                    "anomaly.opened", "anomaly", str(anomaly_id),
                    {"version": row["version"], "current_source_system":
                     row["current_source_system"], "incoming_source_system":
                     row["incoming_source_system"], "differing_fields": len(row["diff"])},
                    row["idempotency_key"],
                )
            )
    return [
        known[(q.key, q.version, q.current.payload_hash,
               messages[q.message_index].payload_hash)]
        for q in quarantines
    ]
