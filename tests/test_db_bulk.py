"""The driver-level writes of db.py (bulk_insert, insert_columns, insert_returning) store
exactly what SQLAlchemy's own insert stores, on both databases: the hot paths of ingestion
and delivery rely on it."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.exc import DBAPIError

from pipeline_console.db import (
    Database,
    Same,
    Stored,
    bulk_insert,
    insert_columns,
    insert_returning,
    stored_form,
)
from pipeline_console.entity_types.service import put_entity_type
from pipeline_console.models import IngestionAttempt, RecordState

NOW = datetime(2026, 11, 24, 10, 0, 0, 123456, tzinfo=UTC)
_attempts = IngestionAttempt.__table__


def _attempt(n: int, payload: dict | None) -> dict:
    return {
        "id": n, "received_at": NOW + timedelta(seconds=n), "decision": "accept_new",
        "reason": f"reason {n}", "source_system": "erp", "entity_type": "customer",
        "entity_id": f"C-{n}", "idempotency_key": f"customer:C-{n}", "version": n,
        "payload_hash": "h", "payload": payload, "message_id": None, "correlation_id": None,
        "occurred_at": None, "staging_status": None, "anomaly_id": None, "raw_body": None,
        "errors": None,
    }


async def _stored(database: Database, ids: list[int]) -> list[tuple]:
    """The rows as the database holds them (JSON and timestamps as their stored form)."""
    async with database.read() as session:
        result = await session.execute(
            text("SELECT id, received_at, payload, errors, occurred_at, version "
                 "FROM ingestion_attempts WHERE id IN (" + ", ".join(map(str, ids)) + ") "
                 "ORDER BY id"))
        return [tuple(str(value) if value is not None else None for value in row)
                for row in result]


PAYLOADS = [{"name": "Ada", "nested": {"list": [1, 2, "ü"]}}, {}, None]


async def test_the_driver_level_writes_store_what_sqlalchemy_stores(database):
    reference = [_attempt(n, payload) for n, payload in enumerate(PAYLOADS, 1)]
    async with database.transaction() as session:
        await session.execute(insert(_attempts), reference)
        await bulk_insert(session, _attempts,
                          [{**row, "id": row["id"] + 10} for row in reference])
        form = stored_form(session, _attempts, "payload")
        columns = {name: [row[name] for row in reference] for name in reference[0]}
        await insert_columns(session, _attempts, {
            **columns,
            "id": [row["id"] + 20 for row in reference],
            "payload": Stored([form(row["payload"]) for row in reference]),
            "decision": Same("accept_new"),
        })
        # PostgreSQL: one array per column through unnest; SQLite: a VALUES list
        await insert_returning(session, _attempts,
                               [{**row, "id": row["id"] + 30} for row in reference],
                               conflict="ON CONFLICT (id) DO NOTHING", returning=["id"])
    by_sqlalchemy = await _stored(database, [1, 2, 3])
    assert await _stored(database, [31, 32, 33]) == [
        (str(int(row[0]) + 30), *row[1:]) for row in by_sqlalchemy]
    assert await _stored(database, [11, 12, 13]) == [
        (str(int(row[0]) + 10), *row[1:]) for row in by_sqlalchemy]
    assert await _stored(database, [21, 22, 23]) == [
        (str(int(row[0]) + 20), *row[1:]) for row in by_sqlalchemy]
    async with database.read() as session:
        read = (await session.execute(
            select(IngestionAttempt).where(IngestionAttempt.id > 20).order_by(
                IngestionAttempt.id))).scalars().all()
    assert [row.payload for row in read] == PAYLOADS * 2
    assert [row.received_at for row in read] == [row["received_at"] for row in reference] * 2


async def test_a_same_value_is_shared_by_every_row_and_columns_must_agree(database):
    async with database.transaction() as session:
        with pytest.raises(ValueError, match="lengths"):
            await insert_columns(session, _attempts, {
                "id": [1, 2], "received_at": Same(NOW), "decision": ["a", "b", "c"]})
        with pytest.raises(ValueError, match="none per row"):
            await insert_columns(session, _attempts, {"received_at": Same(NOW)})
        await insert_columns(session, _attempts, {
            "id": [1, 2, 3], "received_at": Same(NOW), "decision": Same("rejected"),
            "reason": ["a", "b", "c"]})
    async with database.read() as session:
        rows = (await session.execute(
            select(IngestionAttempt.received_at, IngestionAttempt.decision).order_by(
                IngestionAttempt.id))).all()
    assert rows == [(NOW, "rejected")] * 3


async def test_insert_returning_takes_rows_or_columns_and_returns_only_what_it_wrote(database):
    def state(key: str) -> dict:
        return {"idempotency_key": key, "entity_type": "customer", "entity_id": key,
                "current_version": 1, "payload_hash": "h", "source_system": "erp",
                "first_seen_at": NOW, "updated_at": NOW}

    conflict = "ON CONFLICT (idempotency_key) DO NOTHING"
    async with database.transaction() as session:
        await put_entity_type(session, "customer", None, actor="test", now=NOW)
        first = await insert_returning(session, RecordState.__table__,
                                       [state("a"), state("b")], conflict=conflict,
                                       returning=["idempotency_key"])
        columns = {name: [state(key)[name] for key in ("b", "c")] for name in state("b")}
        second = await insert_returning(session, RecordState.__table__,
                                        {**columns, "first_seen_at": Same(NOW)},
                                        conflict=conflict, returning=["idempotency_key"])
    assert sorted(row[0] for row in first) == ["a", "b"]
    assert [row[0] for row in second] == ["c"]
    async with database.read() as session:
        seen = (await session.execute(select(RecordState.first_seen_at))).scalars().all()
    assert seen == [NOW] * 3


async def test_a_string_too_long_for_its_column_is_never_cut(database, backend):
    """PostgreSQL's insert_returning sends strings as text arrays: the insert into
    VARCHAR(64) refuses one too long (an explicit cast to VARCHAR(64) would cut it).
    SQLite does not enforce lengths at all: it keeps the whole string."""
    long_name = "x" * 65
    row = {"idempotency_key": "k", "entity_type": "customer", "entity_id": "k",
           "current_version": 1, "payload_hash": "h", "source_system": long_name,
           "first_seen_at": NOW, "updated_at": NOW}
    async with database.transaction() as session:
        await put_entity_type(session, "customer", None, actor="test", now=NOW)
    if backend == "postgresql":
        with pytest.raises(DBAPIError, match="too long"):
            async with database.transaction() as session:
                await insert_returning(session, RecordState.__table__, [row],
                                       conflict="ON CONFLICT DO NOTHING",
                                       returning=["idempotency_key"])
        return
    async with database.transaction() as session:
        await insert_returning(session, RecordState.__table__, [row],
                               conflict="ON CONFLICT DO NOTHING", returning=["idempotency_key"])
    async with database.read() as session:
        assert await session.scalar(select(RecordState.source_system)) == long_name
