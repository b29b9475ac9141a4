"""inspect_record: one record's whole history from every table, in a bounded number of
queries whatever the history's length: one for the state, the production row and every
section's total, then one per section that has rows. Each list keeps its newest `limit` rows
and reports its total, so a long history is capped, never silently cut."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.errors import NotFound
from pipeline_console.inspector import timeline
from pipeline_console.models import (
    AmbiguousOutcome,
    Anomaly,
    AuditEvent,
    Circuit,
    Correlation,
    DeadLetter,
    Delivery,
    DeliveryAttempt,
    IngestionAttempt,
    ProductionRecord,
    RecordState,
    ReplayExecution,
    ReplayItem,
    ReplayRequest,
    StagingRecord,
)

SECTIONS = ("attempts", "staging", "correlations", "anomalies", "deliveries",
            "delivery_attempts", "dlq", "ambiguous", "circuits", "replays",
            "replay_executions", "audit")


@dataclass
class Inspection:
    state: RecordState
    production: ProductionRecord | None
    sections: dict[str, list[Any]] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    timeline: list[timeline.Entry] = field(default_factory=list)


async def _newest(session: AsyncSession, entity: Any, order: Any, limit: int,
                  *where: Any) -> tuple[list[Any], int]:
    """The newest `limit` rows, oldest first, and how many there are in all (one query).

    The rows are read-only Core rows (attribute access by column name), not ORM objects:
    building an ORM instance per row was half the time of inspecting a long history."""
    total = func.count().over().label("total")
    rows = (await session.execute(
        select(entity.__table__, total).where(*where).order_by(order.desc()).limit(limit)
    )).all()
    return list(reversed(rows)), (rows[0].total if rows else 0)


def _section_queries(key: str) -> dict[str, tuple[Any, Any, Any]]:
    """Each section: (model, order, the condition that selects the record's rows)."""
    deliveries_of_key = select(Delivery.id).where(Delivery.idempotency_key == key)
    events_of_key = select(Correlation.correlation_id).where(Correlation.idempotency_key == key)
    items_of_key = select(ReplayItem.id).where(ReplayItem.idempotency_key == key)
    return {
        "attempts": (IngestionAttempt, IngestionAttempt.id,
                     IngestionAttempt.idempotency_key == key),
        "staging": (StagingRecord, StagingRecord.id, StagingRecord.idempotency_key == key),
        # the record's business events, with every sibling record of each
        "correlations": (Correlation, Correlation.id,
                         Correlation.correlation_id.in_(events_of_key)),
        "anomalies": (Anomaly, Anomaly.id, Anomaly.idempotency_key == key),
        "deliveries": (Delivery, Delivery.id, Delivery.idempotency_key == key),
        "delivery_attempts": (DeliveryAttempt, DeliveryAttempt.id,
                              DeliveryAttempt.delivery_id.in_(deliveries_of_key)),
        "dlq": (DeadLetter, DeadLetter.id, DeadLetter.idempotency_key == key),
        "ambiguous": (AmbiguousOutcome, AmbiguousOutcome.id,
                      AmbiguousOutcome.idempotency_key == key),
        "circuits": (Circuit, Circuit.system, Circuit.system.in_(
            select(Delivery.system).where(Delivery.idempotency_key == key))),
        "replay_executions": (ReplayExecution, ReplayExecution.id,
                              ReplayExecution.item_id.in_(items_of_key)),
        "audit": (AuditEvent, AuditEvent.id, AuditEvent.idempotency_key == key),
        "replays": (ReplayItem, ReplayItem.id, ReplayItem.idempotency_key == key),
    }


async def _rows(session: AsyncSession, entity: Any, order: Any, limit: int,
                condition: Any) -> list[Any]:
    """The newest `limit` rows, oldest first, as read-only Core rows (attribute access by
    column name), not ORM objects: building an ORM instance per row was half the time of
    inspecting a long history."""
    rows = (await session.execute(select(entity.__table__).where(condition)
                                  .order_by(order.desc()).limit(limit))).all()
    return list(reversed(rows))


async def inspect_record(session: AsyncSession, key: str, *, limit: int) -> Inspection:
    queries = _section_queries(key)
    # One round trip for the state, the production row and every section's total (each an
    # index-only count); then only the sections that have rows are read. Most records have
    # no anomaly, dead letter, ambiguous outcome or replay: half the queries are saved.
    totals = [select(func.count()).select_from(entity.__table__).where(condition)
              .scalar_subquery().label(name)
              for name, (entity, _, condition) in queries.items()]
    head = (await session.execute(
        select(RecordState, ProductionRecord, *totals)
        .outerjoin(ProductionRecord,
                   ProductionRecord.idempotency_key == RecordState.idempotency_key)
        .where(RecordState.idempotency_key == key))).one_or_none()
    if head is None:
        raise NotFound(f"no record has the key {key!r}")
    found = Inspection(state=head[0], production=head[1])
    for name, (entity, order, condition) in queries.items():
        found.totals[name] = head._mapping[name]
        found.sections[name] = []
        if found.totals[name] and name != "replays":
            found.sections[name] = await _rows(session, entity, order, limit, condition)
            # on PostgreSQL each statement has its own snapshot: rows that arrived since
            # the totals were read are shown, and counted
            found.totals[name] = max(found.totals[name], len(found.sections[name]))
    if found.totals["replays"]:
        replay_rows = (await session.execute(
            select(ReplayRequest, ReplayItem)
            .join(ReplayItem, ReplayItem.request_id == ReplayRequest.id)
            .where(ReplayItem.idempotency_key == key)
            .order_by(ReplayItem.id.desc()).limit(limit))).all()
        found.sections["replays"] = [(row[0], row[1]) for row in reversed(replay_rows)]

    found.timeline = timeline.merge(
        [timeline.attempt_entry(row) for row in found.sections["attempts"]],
        [timeline.audit_entry(row) for row in found.sections["audit"]
         if row.action not in ("replay.validated", "replay.rejected")],
        [timeline.delivery_attempt_entry(row) for row in found.sections["delivery_attempts"]],
        [timeline.replay_entry(request, item) for request, item in found.sections["replays"]],
    )
    return found


@dataclass
class EventInspection:
    states: list[RecordState]
    production: list[ProductionRecord]
    attempts: list[IngestionAttempt]
    totals: dict[str, int]
    timeline: list[timeline.Entry]


async def inspect_event(session: AsyncSession, *, correlation_id: str | None,
                        message_id: str | None, limit: int) -> EventInspection:
    """The business-event view (every record of a correlation id) or the message view (every
    attempt that carried a message id, and its records), in a fixed number of queries."""
    if correlation_id is not None:
        keys_query = select(Correlation.idempotency_key).where(
            Correlation.correlation_id == correlation_id)
        attempt_filter = IngestionAttempt.idempotency_key.in_(keys_query)
        what = f"correlation id {correlation_id!r}"
    else:
        keys_query = select(IngestionAttempt.idempotency_key).where(
            IngestionAttempt.message_id == message_id)
        attempt_filter = IngestionAttempt.message_id == message_id
        what = f"message id {message_id!r}"
    states, total_states = await _newest(session, RecordState, RecordState.idempotency_key,
                                         limit, RecordState.idempotency_key.in_(keys_query))
    attempts, total_attempts = await _newest(session, IngestionAttempt, IngestionAttempt.id,
                                             limit, attempt_filter)
    if not states and not attempts:
        raise NotFound(f"nothing was received with the {what}")
    production = list((await session.execute(select(ProductionRecord).where(
        ProductionRecord.idempotency_key.in_(keys_query)))).scalars())
    audit, total_audit = await _newest(session, AuditEvent, AuditEvent.id, limit,
                                       AuditEvent.idempotency_key.in_(keys_query))
    return EventInspection(
        states=states, production=production, attempts=attempts,
        totals={"records": total_states, "attempts": total_attempts, "audit": total_audit},
        timeline=timeline.merge(
            [timeline.attempt_entry(row) for row in attempts],
            [timeline.audit_entry(row) for row in audit
             if row.action in ("record.promoted", "anomaly.opened", "anomaly.resolved")]),
    )


@dataclass(frozen=True)
class Found:
    key: str
    how: str  # "key", "entity id", "correlation id", "message id"


async def find_records(session: AsyncSession, text: str, *, limit: int = 50) -> list[Found]:
    """Records whose key, entity id, correlation id or message id is exactly `text`."""
    text = text.strip()
    if not text:
        return []
    found: dict[str, Found] = {}
    lookups = (
        ("key", select(RecordState.idempotency_key)
         .where(RecordState.idempotency_key == text)),
        ("entity id", select(RecordState.idempotency_key)
         .where(RecordState.entity_id == text).order_by(RecordState.idempotency_key)),
        ("correlation id", select(Correlation.idempotency_key)
         .where(Correlation.correlation_id == text).order_by(Correlation.id)),
        ("message id", select(IngestionAttempt.idempotency_key)
         .where(IngestionAttempt.message_id == text,
                IngestionAttempt.idempotency_key.is_not(None))
         .order_by(IngestionAttempt.id)),
    )
    for how, query in lookups:
        for key in (await session.execute(query.limit(limit))).scalars():
            found.setdefault(key, Found(key, how))
    return list(found.values())[:limit]
