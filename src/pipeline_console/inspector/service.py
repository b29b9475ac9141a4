"""inspect_record: one record's whole history from every table, in a bounded number of
queries whatever the history's length: one for the state, the production row and every
section's total, then one per section that has rows. Each list keeps its newest `limit` rows
and reports its total, so a long history is capped, never silently cut."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Integer, Select, String, Table, bindparam, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.errors import NotFound
from pipeline_console.inspector import timeline
from pipeline_console.inspector.stored_json import as_redacted, as_stored, decoded
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

    def decoded_sections(self) -> dict[str, list[Any]]:
        """The sections with their stored JSON decoded, for a reader that looks inside the
        payloads (the console's page, the pydantic models)."""
        return {name: decoded(rows) if name in _HOLDS_STORED_JSON else rows
                for name, rows in self.sections.items()}


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


_KEY = bindparam("key", type_=String)
_LIMIT = bindparam("limit", type_=Integer)


@dataclass(frozen=True)
class _Section:
    table: Table
    order: Any
    condition: Any
    # JSON columns only passed through to the answer: read as their text (stored_json.py)
    stored: tuple[str, ...] = ()
    # columns neither the API's schema nor the console shows
    unread: tuple[str, ...] = ()
    # JSON columns whose old rows may hold a URL with user:password@ (redaction.py)
    redacted: tuple[str, ...] = ()

    def _column(self, column: Any) -> Any:
        if column.name in self.stored:
            return as_stored(column, redacted=column.name in self.redacted)
        return as_redacted(column) if column.name in self.redacted else column

    def rows(self) -> Select[Any]:
        """The newest `limit` rows (the caller puts them oldest first)."""
        columns = [self._column(column)
                   for column in self.table.c if column.name not in self.unread]
        return (select(*columns).where(self.condition).order_by(self.order.desc())
                .limit(_LIMIT))

    def total(self, name: str) -> Any:
        return (select(func.count()).select_from(self.table).where(self.condition)
                .scalar_subquery().label(name))


def _sections() -> dict[str, _Section]:
    deliveries_of_key = select(Delivery.id).where(Delivery.idempotency_key == _KEY)
    events_of_key = select(Correlation.correlation_id).where(
        Correlation.idempotency_key == _KEY)
    items_of_key = select(ReplayItem.id).where(ReplayItem.idempotency_key == _KEY)
    return {
        "attempts": _Section(IngestionAttempt.__table__, IngestionAttempt.id,
                             IngestionAttempt.idempotency_key == _KEY,
                             stored=("payload", "errors")),
        "staging": _Section(StagingRecord.__table__, StagingRecord.id,
                            StagingRecord.idempotency_key == _KEY,
                            stored=("payload", "validation_errors")),
        # the record's business events, with every sibling record of each
        "correlations": _Section(Correlation.__table__, Correlation.id,
                                 Correlation.correlation_id.in_(events_of_key)),
        "anomalies": _Section(Anomaly.__table__, Anomaly.id, Anomaly.idempotency_key == _KEY),
        # a delivery's payload is its version's, which the staging section already has
        "deliveries": _Section(Delivery.__table__, Delivery.id,
                               Delivery.idempotency_key == _KEY, unread=("payload",)),
        "delivery_attempts": _Section(DeliveryAttempt.__table__, DeliveryAttempt.id,
                                      DeliveryAttempt.delivery_id.in_(deliveries_of_key),
                                      stored=("request",), redacted=("request",)),
        "dlq": _Section(DeadLetter.__table__, DeadLetter.id,
                        DeadLetter.idempotency_key == _KEY),
        "ambiguous": _Section(AmbiguousOutcome.__table__, AmbiguousOutcome.id,
                              AmbiguousOutcome.idempotency_key == _KEY),
        "circuits": _Section(Circuit.__table__, Circuit.system, Circuit.system.in_(
            select(Delivery.system).where(Delivery.idempotency_key == _KEY))),
        "replay_executions": _Section(ReplayExecution.__table__, ReplayExecution.id,
                                      ReplayExecution.item_id.in_(items_of_key)),
        # details stay decoded: the timeline's sentences read them
        "audit": _Section(AuditEvent.__table__, AuditEvent.id,
                          AuditEvent.idempotency_key == _KEY, redacted=("details",)),
        "replays": _Section(ReplayItem.__table__, ReplayItem.id,
                            ReplayItem.idempotency_key == _KEY),
    }


# Built once, with the key and the limit as parameters: SQLAlchemy then computes each
# statement's cache key once, not on every inspection (a tenth of an inspection's time).
_SECTIONS = _sections()
_HOLDS_STORED_JSON = {name for name, section in _SECTIONS.items() if section.stored}
_ROWS = {name: section.rows() for name, section in _SECTIONS.items() if name != "replays"}
_HEAD = (select(RecordState, ProductionRecord,
                *[section.total(name) for name, section in _SECTIONS.items()])
         .outerjoin(ProductionRecord,
                    ProductionRecord.idempotency_key == RecordState.idempotency_key)
         .where(RecordState.idempotency_key == _KEY))
_REPLAYS = (select(ReplayRequest, ReplayItem)
            .join(ReplayItem, ReplayItem.request_id == ReplayRequest.id)
            .where(ReplayItem.idempotency_key == _KEY)
            .order_by(ReplayItem.id.desc()).limit(_LIMIT))


async def inspect_record(session: AsyncSession, key: str, *, limit: int) -> Inspection:
    """The sections' rows are read-only Core rows (attribute access by column name), read
    on the session's connection: building an ORM instance per row, then the ORM's result
    processing of Core rows, were the largest part of inspecting a long history. The JSON
    columns the answer only passes on are StoredJSON (stored_json.py)."""
    params = {"key": key, "limit": limit}
    # One round trip for the state, the production row and every section's total (each an
    # index-only count); then only the sections that have rows are read. Most records have
    # no anomaly, dead letter, ambiguous outcome or replay: half the queries are saved.
    head = (await session.execute(_HEAD, params)).one_or_none()
    if head is None:
        raise NotFound(f"no record has the key {key!r}")
    found = Inspection(state=head[0], production=head[1])
    connection = await session.connection()
    for name in _SECTIONS:
        found.totals[name] = head._mapping[name]
        found.sections[name] = []
        if found.totals[name] and name != "replays":
            rows = (await connection.execute(_ROWS[name], params)).all()
            found.sections[name] = rows[::-1]
            # on PostgreSQL each statement has its own snapshot: rows that arrived since
            # the totals were read are shown, and counted
            found.totals[name] = max(found.totals[name], len(rows))
    if found.totals["replays"]:
        replay_rows = (await session.execute(_REPLAYS, params)).all()
        found.sections["replays"] = [(row[0], row[1]) for row in reversed(replay_rows)]

    staged = {row.attempt_id: row for row in found.sections["staging"]}
    found.timeline = timeline.merge(
        [timeline.attempt_entry(row, staged.get(row.id)) for row in found.sections["attempts"]],
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
             if row.action in ("record.promoted", "record.superseded", "anomaly.opened",
                               "anomaly.resolved")]),
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
