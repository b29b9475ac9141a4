"""The transactional outbox: promotion writes one delivery per subscribed system in the same
transaction, so a crash can never lose a delivery.

A newer version supersedes older deliveries of the same record to the same system that have
not been sent yet (pending or held): the newer payload is the entity's full state, so the
older one would only be overwritten. Deliveries already in flight are left alone; the
canonical delivery function refuses to send a version older than one already queued or
delivered, so an older version never reaches a system after a newer one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.models import Delivery, DownstreamSystem


async def enqueue_deliveries(
    session: AsyncSession, promoted: Sequence[dict[str, Any]], now: datetime
) -> int:
    """Queue deliveries for production rows just written; returns how many were queued."""
    if not promoted:
        return 0
    subscriptions: dict[str, list[str]] = {}
    for name, entity_types in (
        await session.execute(select(DownstreamSystem.name, DownstreamSystem.entity_types))
    ).all():
        for entity_type in entity_types:
            subscriptions.setdefault(entity_type, []).append(name)
    rows = [
        {
            "system": system,
            "idempotency_key": record["idempotency_key"],
            "entity_type": record["entity_type"],
            "entity_id": record["entity_id"],
            "version": record["version"],
            "payload": record["payload"],
            "correlation_id": record["correlation_id"],
            "status": "pending",
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        }
        for record in promoted
        for system in sorted(subscriptions.get(record["entity_type"], []))
    ]
    if not rows:
        return 0
    table = Delivery.__table__
    await session.execute(
        update(table)
        .where(
            and_(
                table.c.system == bindparam("target_system"),
                table.c.idempotency_key == bindparam("key"),
                table.c.version < bindparam("newer"),
                # (an IN list cannot be used with executemany)
                or_(table.c.status == "pending", table.c.status == "held"),
            )
        )
        .values(status="superseded", updated_at=now,
                last_error=bindparam("why")),
        [{"target_system": row["system"], "key": row["idempotency_key"],
          "newer": row["version"], "why": f"superseded by version {row['version']}"}
         for row in rows],
    )
    await session.execute(insert(table), rows)
    return len(rows)
