"""ingest_messages: decide a batch with the planner, then persist the plan with a few
statements per table. The caller owns the transaction (this module never commits).

Race-safety: on PostgreSQL the first message of a new key inserts the key's state row with
INSERT … ON CONFLICT DO NOTHING (keys in sorted order, so concurrent batches cannot deadlock);
every other key is read with SELECT … FOR UPDATE. A transaction that loses the race for a new
key waits on the winner's insert, then reads and decides against the winner's row. On SQLite
the write transaction already holds the database's write lock (BEGIN IMMEDIATE), so the batch
reads the known keys' states and inserts the new ones with a plain executemany.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pipeline_console.anomalies.opening import open_anomalies
from pipeline_console.audit.service import AuditEntry, append_audit
from pipeline_console.db import (
    Same,
    Stored,
    allocate_ids,
    bulk_update,
    insert_columns,
    insert_for,
    insert_returning,
    stored_form,
)
from pipeline_console.entity_types.completeness import completeness_for
from pipeline_console.ingestion.intake import RejectedMessage
from pipeline_console.ingestion.planner import (
    AuditDraft,
    IncomingMessage,
    KeySnapshot,
    Outcome,
    Plan,
    plan_batch,
    superseded_draft,
)
from pipeline_console.ingestion.policy import REJECTED, CurrentState, Decision
from pipeline_console.models import (
    Correlation,
    EntityType,
    IngestionAttempt,
    ProductionRecord,
    RecordState,
    StagingRecord,
)
from pipeline_console.records.promotion import write_production


class Accepted(NamedTuple):
    """The decision for one message, as the API returns it (a NamedTuple: one per message)."""

    decision: str
    idempotency_key: str
    version: int
    attempt_id: int
    staging_status: str | None
    anomaly_id: int | None
    reason: str


@dataclass(frozen=True)
class Rejected:
    rejection: RejectedMessage
    attempt_id: int


async def ingest_messages(
    session: AsyncSession,
    items: Sequence[IncomingMessage | RejectedMessage],
    *,
    now: datetime,
    actor: str,
) -> list[Accepted | Rejected]:
    """Decide and record every item, in order. Returns one result per item."""
    if not items:
        return []
    messages = [item for item in items if isinstance(item, IncomingMessage)]
    audit: list[AuditEntry] = []
    plan, anomaly_ids = Plan(), []
    if messages:
        schemas = await _register_entity_types(session, messages, now, audit)
        snapshots = await _lock_states(session, messages, now)
        plan = plan_batch(messages, snapshots, completeness_for(schemas))
        anomaly_ids = await open_anomalies(session, messages, plan.quarantines, now, audit)

    # Each payload is serialized once, for the attempt, staging and production rows alike.
    payloads = list(map(stored_form(session, StagingRecord.__table__, "payload"),
                        [message.payload for message in messages]))
    attempt_ids = await _write_attempts(session, items, messages, payloads, plan, anomaly_ids,
                                        now, actor)
    message_attempts = (attempt_ids if len(messages) == len(items) else [
        attempt_id for item, attempt_id in zip(items, attempt_ids, strict=True)
        if isinstance(item, IncomingMessage)
    ])
    if messages:
        superseded_earlier = await _write_staging_and_production(
            session, messages, payloads, plan, snapshots, message_attempts, now)
        await _write_states(session, messages, snapshots, plan, now)
        await _write_correlations(session, messages, message_attempts, now)
        audit.extend(plan.audit)  # an AuditDraft is an AuditEntry's shape
        audit.extend(superseded_earlier)
    await append_audit(session, audit, actor=actor, now=now)

    results: list[Accepted | Rejected] = []
    outcomes = iter(zip(plan.outcomes, messages, message_attempts, strict=True))
    for item, attempt_id in zip(items, attempt_ids, strict=True):
        if isinstance(item, RejectedMessage):
            results.append(Rejected(item, attempt_id))
            continue
        outcome, message, _ = next(outcomes)
        results.append(
            Accepted(
                decision=str(outcome.decision),
                idempotency_key=message.key,
                version=message.version,
                attempt_id=attempt_id,
                staging_status=outcome.staging_status,
                anomaly_id=(
                    anomaly_ids[outcome.quarantine_index]
                    if outcome.quarantine_index is not None else None
                ),
                reason=outcome.reason,
            )
        )
    return results


async def _register_entity_types(
    session: AsyncSession,
    messages: Sequence[IncomingMessage],
    now: datetime,
    audit: list[AuditEntry],
) -> dict[str, dict[str, Any] | None]:
    """Entity types are registered on first sight (without a schema: always complete)."""
    names = sorted({message.entity_type for message in messages})
    insert_ = insert_for(session.bind.dialect.name)
    created = await session.execute(
        insert_(EntityType.__table__)
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(EntityType.__table__.c.name),
        [{"name": name, "schema": None, "created_at": now, "updated_at": now} for name in names],
    )
    for name in created.scalars():
        audit.append(AuditEntry("entity_type.registered", "entity_type", name, {"schema": None}))
    rows = await session.execute(
        select(EntityType.name, EntityType.json_schema).where(EntityType.name.in_(names))
    )
    return {row.name: row.json_schema for row in rows}


# Built once: a literal IN list is coerced element by element on every call (SQLAlchemy
# makes a bound value of each of a batch's hundreds of keys); an expanding parameter is not.
# The key's production version comes with its state (one statement, not two); on PostgreSQL
# only the state row is locked.
_LOCK_STATES = (
    select(RecordState.idempotency_key, RecordState.current_version,
           RecordState.payload_hash, RecordState.source_system, ProductionRecord.version)
    .outerjoin(ProductionRecord,
               ProductionRecord.idempotency_key == RecordState.idempotency_key)
    .where(RecordState.idempotency_key.in_(bindparam("keys", expanding=True)))
    .order_by(RecordState.idempotency_key)
    .with_for_update(of=RecordState)
)


async def _lock_states(
    session: AsyncSession, messages: Sequence[IncomingMessage], now: datetime
) -> dict[str, KeySnapshot]:
    first_by_key: dict[str, IncomingMessage] = {}
    for message in messages:
        first_by_key.setdefault(message.key, message)
    keys = sorted(first_by_key)

    def new_states(keys: list[str]) -> dict[str, Any]:
        firsts = [first_by_key[key] for key in keys]
        return {
            "idempotency_key": keys,
            "entity_type": [message.entity_type for message in firsts],
            "entity_id": [message.entity_id for message in firsts],
            "current_version": [message.version for message in firsts],
            "payload_hash": [message.payload_hash for message in firsts],
            "source_system": [message.source_system for message in firsts],
            "first_seen_at": Same(now),
            "updated_at": Same(now),
        }

    if session.bind.dialect.name == "sqlite":
        # The transaction holds the database's write lock from its first statement (BEGIN
        # IMMEDIATE): no other writer can create a key between this read and the insert, so
        # the new keys are one plain executemany (no statement of thousands of parameters
        # to parse, no RETURNING rows to read).
        states = (await session.execute(_LOCK_STATES, {"keys": keys})).all()
        known = {row[0] for row in states}
        await insert_columns(session, RecordState.__table__,
                             new_states([key for key in keys if key not in known]))
    else:
        created = await insert_returning(
            session, RecordState.__table__, new_states(keys),
            conflict="ON CONFLICT (idempotency_key) DO NOTHING", returning=["idempotency_key"],
        )
        existing = sorted(set(keys) - {row[0] for row in created})
        states = (await session.execute(_LOCK_STATES, {"keys": existing})).all() if existing \
            else []
    # (key, current version, payload hash, source system, production version)
    return {key: KeySnapshot(CurrentState(version, payload_hash, source), production)
            for key, version, payload_hash, source, production in states}


_staging = StagingRecord.__table__
_SUPERSEDE_STAGED = (
    update(_staging)
    .where(_staging.c.idempotency_key.in_(bindparam("keys", expanding=True)),
           _staging.c.status.in_(("partial", "complete")))
    .values(status=bindparam("superseded"), updated_at=bindparam("now"))
    # the rows a newer version superseded before they were ever promoted, for the audit log
    # (few: most keys have no waiting row); a partial row is the one with validation errors
    .returning(_staging.c.id, _staging.c.idempotency_key, _staging.c.version,
               _staging.c.source_system, _staging.c.validation_errors)
)


class _Unparsed(NamedTuple):
    """What the attempt log knows of a rejected message, in IncomingMessage's names."""

    source_system: str | None
    entity_type: str | None
    entity_id: str | None
    key: str | None
    version: int | None
    correlation_id: str | None
    message_id: str | None
    payload: None = None
    payload_hash: None = None
    occurred_at: None = None


async def _write_attempts(
    session: AsyncSession,
    items: Sequence[IncomingMessage | RejectedMessage],
    messages: Sequence[IncomingMessage],
    payloads: list[Any],
    plan: Plan,
    anomaly_ids: list[int],
    now: datetime,
    actor: str,
) -> list[int]:
    """One attempt row per item, written as columns (no dict per row)."""
    table = IngestionAttempt.__table__
    if len(messages) == len(items):
        subjects: Sequence[Any] = messages
        outcomes: Sequence[Outcome] = plan.outcomes
        stored_payloads = payloads
    else:  # rejections among them: they stand in the same columns
        subjects, outcomes, stored_payloads = [], [], []
        decided = iter(zip(messages, plan.outcomes, payloads, strict=True))
        no_payload = stored_form(session, table, "payload")(None)
        for item in items:
            if isinstance(item, RejectedMessage):
                known = item.known
                subjects.append(_Unparsed(
                    known.get("source_system"), known.get("entity_type"),
                    known.get("entity_id"), known.get("idempotency_key"),
                    known.get("version"), known.get("correlation_id"),
                    known.get("message_id")))
                outcomes.append(Outcome(REJECTED, f"rejected: {item.detail}",  # type: ignore[arg-type]
                                        None, None, None))
                stored_payloads.append(no_payload)
            else:
                message, outcome, payload = next(decided)
                subjects.append(message)
                outcomes.append(outcome)
                stored_payloads.append(payload)
    ids = await allocate_ids(session, table, len(items))
    await insert_columns(session, table, {
        "id": ids,
        "received_at": Same(now),
        "actor": Same(actor),
        "decision": [str(outcome.decision) for outcome in outcomes],  # a StrEnum's value
        "reason": [outcome.reason for outcome in outcomes],
        "source_system": [subject.source_system for subject in subjects],
        "entity_type": [subject.entity_type for subject in subjects],
        "entity_id": [subject.entity_id for subject in subjects],
        "idempotency_key": [subject.key for subject in subjects],
        "version": [subject.version for subject in subjects],
        "payload_hash": [subject.payload_hash for subject in subjects],
        "payload": Stored(stored_payloads),
        "message_id": [subject.message_id for subject in subjects],
        "correlation_id": [subject.correlation_id for subject in subjects],
        "occurred_at": [subject.occurred_at for subject in subjects],
        "staging_status": [outcome.staging_status for outcome in outcomes],
        "anomaly_id": [
            anomaly_ids[outcome.quarantine_index]
            if outcome.quarantine_index is not None else None
            for outcome in outcomes
        ],
        "raw_body": [item.raw_body if isinstance(item, RejectedMessage) else None
                     for item in items],
        "errors": [[error.as_dict() for error in item.errors]
                   if isinstance(item, RejectedMessage) else None for item in items],
    })
    return ids


async def _write_staging_and_production(
    session: AsyncSession,
    messages: Sequence[IncomingMessage],
    payloads: list[Any],
    plan: Plan,
    snapshots: dict[str, KeySnapshot],
    attempt_ids: list[int],
    now: datetime,
) -> list[AuditDraft]:
    """Writes the staging rows and production; returns the record.superseded events of the
    rows of earlier batches that this batch's newer versions superseded."""
    audit: list[AuditDraft] = []
    if plan.superseding_keys:
        superseded = (await session.execute(_SUPERSEDE_STAGED, {
            "keys": sorted(plan.superseding_keys), "superseded": "superseded", "now": now}
        )).all()
        audit.extend(
            superseded_draft(key, version, source_system,
                             "partial" if errors else "complete",
                             plan.superseding_keys[key], within_batch=False)
            for _, key, version, source_system, errors in sorted(superseded))
    if not plan.staging:
        return audit
    table = StagingRecord.__table__
    staging = plan.staging
    staged = [messages[row.message_index] for row in staging]
    staging_ids = await allocate_ids(session, table, len(staging))
    await insert_columns(session, table, {
        "id": staging_ids,
        "idempotency_key": [row.key for row in staging],
        "entity_type": [message.entity_type for message in staged],
        "entity_id": [message.entity_id for message in staged],
        "version": [row.version for row in staging],
        "source_system": [message.source_system for message in staged],
        "payload": Stored([payloads[row.message_index] for row in staging]),
        "payload_hash": [message.payload_hash for message in staged],
        "status": [row.status for row in staging],
        "validation_errors": [row.validation_errors or None for row in staging],
        "correlation_id": [message.correlation_id for message in staged],
        "attempt_id": [attempt_ids[row.message_index] for row in staging],
        "anomaly_id": Same(None),
        "staged_at": Same(now),
        "updated_at": Same(now),
        "promoted_at": [now if row.status == "promoted" else None for row in staging],
    })
    production_rows, production_payloads = [], []
    for key, staging_index in sorted(plan.production.items()):
        message = staged[staging_index]
        production_rows.append(
            {
                "idempotency_key": key,
                "entity_type": message.entity_type,
                "entity_id": message.entity_id,
                "version": message.version,
                "payload": message.payload,
                "payload_hash": message.payload_hash,
                "source_system": message.source_system,
                "correlation_id": message.correlation_id,
                "staging_id": staging_ids[staging_index],
                "promoted_at": now,
            }
        )
        production_payloads.append(payloads[staging[staging_index].message_index])
    # A key with no state before this batch has no production row either. On SQLite the
    # others' production versions were read with their states, under the write lock held
    # since (write_production uses them there only; PostgreSQL keeps its guarded upsert).
    await write_production(
        session, production_rows, stored_payloads=production_payloads,
        new_keys={row["idempotency_key"] for row in production_rows
                  if row["idempotency_key"] not in snapshots},
        held_versions={key: snapshot.production_version
                       for key, snapshot in snapshots.items()}
        if session.bind.dialect.name == "sqlite" else None)
    return audit


async def _write_states(
    session: AsyncSession,
    messages: Sequence[IncomingMessage],
    snapshots: dict[str, KeySnapshot],
    plan: Plan,
    now: datetime,
) -> None:
    """The final state of every key the batch changed. A key this batch created was inserted
    with its first message's state; it needs no update when that is still its state (most
    new keys: about 70 % of the messages in the benchmark's mix)."""
    first_of_new: dict[str, CurrentState] = {}
    for message in messages:
        if message.key not in snapshots and message.key not in first_of_new:
            first_of_new[message.key] = CurrentState(
                message.version, message.payload_hash, message.source_system)
    rows = [
        {"idempotency_key": key, "current_version": state.version,
         "payload_hash": state.payload_hash, "source_system": state.source_system,
         "updated_at": now}
        for key, state in sorted(plan.new_states.items())
        if first_of_new.get(key) != state
    ]
    await bulk_update(session, RecordState.__table__, "idempotency_key", rows)


async def _write_correlations(
    session: AsyncSession,
    messages: Sequence[IncomingMessage],
    attempt_ids: list[int],
    now: datetime,
) -> None:
    """Every decided message with a correlation id links its key to that business event."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for message, attempt_id in zip(messages, attempt_ids, strict=True):
        if message.correlation_id is None:
            continue
        rows.setdefault(
            (message.correlation_id, message.key),
            {
                "correlation_id": message.correlation_id,
                "idempotency_key": message.key,
                "source_system": message.source_system,
                "version": message.version,
                "attempt_id": attempt_id,
                "created_at": now,
            },
        )
    if not rows:
        return
    insert_ = insert_for(session.bind.dialect.name)
    await session.execute(
        insert_(Correlation.__table__).on_conflict_do_nothing(
            index_elements=["correlation_id", "idempotency_key"]
        ),
        [rows[pair] for pair in sorted(rows)],
    )


__all__ = ["Accepted", "Decision", "Rejected", "ingest_messages"]
