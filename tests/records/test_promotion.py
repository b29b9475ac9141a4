"""write_production: the version guard, the plain-insert path for keys a transaction
created (ingestion's new keys), and SQLite's plain statements for keys whose production
version the transaction read under its write lock (held_versions); the plain paths must
fail loudly rather than overwrite or miscount."""

from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from pipeline_console.delivery.schemas import SystemCreate
from pipeline_console.delivery.systems import create_system
from pipeline_console.models import Delivery, ProductionRecord, RecordState, StagingRecord
from pipeline_console.records.promotion import write_production
from tests.support import ingest_one, message

NOW = datetime(2026, 11, 24, 11, 0, tzinfo=UTC)


def _row(key: str, version: int, name: str, staging_id: int) -> dict:
    entity_type, entity_id = key.split(":")
    return {"idempotency_key": key, "entity_type": entity_type, "entity_id": entity_id,
            "version": version, "payload": {"name": name}, "payload_hash": f"h{version}",
            "source_system": "erp", "correlation_id": None, "staging_id": staging_id,
            "promoted_at": NOW}


async def _staging_id(database) -> int:
    """Any staged row: production rows must point at one."""
    async with database.read() as session:
        return (await session.execute(select(StagingRecord.id).limit(1))).scalar_one()


async def _c1_at_3_and_c2_at_5(database) -> int:
    """customer:C-1 in production at version 3 and C-2 at 5; returns a staged row's id."""
    await ingest_one(database, message(entity_id="C-1", version=3, payload={"name": "v3"}))
    await ingest_one(database, message(entity_id="C-2", version=5, payload={"name": "v5"}))
    return await _staging_id(database)


async def _add_state(session, entity_id: str, version: int) -> None:
    """A key's state row, as ingestion writes it for a key it sees first (before production)."""
    session.add(RecordState(idempotency_key=f"customer:{entity_id}", entity_type="customer",
                            entity_id=entity_id, current_version=version,
                            payload_hash=f"h{version}", source_system="erp",
                            first_seen_at=NOW, updated_at=NOW))
    await session.flush()


async def _production(database) -> dict[str, tuple[int, dict]]:
    async with database.read() as session:
        rows = (await session.execute(select(ProductionRecord))).scalars().all()
    return {row.idempotency_key: (row.version, row.payload) for row in rows}


async def test_a_key_claimed_new_that_has_a_production_row_fails_and_nothing_changes(database):
    await ingest_one(database, message(entity_id="C-1", version=3, payload={"name": "kept"}))
    staging_id = await _staging_id(database)
    with pytest.raises(IntegrityError, match=r"(?i)unique"):
        async with database.transaction() as session:
            await write_production(
                session, [_row("customer:C-1", 4, "overwritten?", staging_id)],
                new_keys={"customer:C-1"})
    assert (await _production(database))["customer:C-1"] == (3, {"name": "kept"})


async def test_new_and_existing_keys_in_one_call_each_take_their_path(database):
    staging_id = await _c1_at_3_and_c2_at_5(database)
    async with database.transaction() as session:
        await _add_state(session, "C-9", 1)
        await write_production(session, [
            _row("customer:C-1", 4, "v4", staging_id),  # newer: replaces
            _row("customer:C-2", 4, "v4", staging_id),  # older: the guard keeps v5
            _row("customer:C-9", 1, "new", staging_id),  # claimed new: inserted
        ], new_keys={"customer:C-9"})
    production = await _production(database)
    assert production["customer:C-1"] == (4, {"name": "v4"})
    assert production["customer:C-2"] == (5, {"name": "v5"})
    assert production["customer:C-9"] == (1, {"name": "new"})


async def _queued(database) -> list[tuple[str, int]]:
    async with database.read() as session:
        rows = await session.execute(select(Delivery.idempotency_key, Delivery.version))
    return sorted(tuple(row) for row in rows)


async def test_held_versions_write_what_the_guard_lets_through_and_queue_exactly_that(
        database):
    """On SQLite the rows are a plain update and insert; PostgreSQL ignores held_versions
    and upserts. Either way the same rows are written and get a delivery."""
    staging_id = await _c1_at_3_and_c2_at_5(database)
    async with database.transaction() as session:
        await create_system(session, SystemCreate(name="crm", transport="simulated",
                                                      entity_types=["customer"]),
                            actor="tester", now=NOW)
    async with database.transaction() as session:
        await _add_state(session, "C-3", 2)
        await write_production(session, [
            _row("customer:C-1", 4, "v4", staging_id),  # newer than held 3: updated
            _row("customer:C-2", 5, "v5 again", staging_id),  # not newer than 5: kept
            _row("customer:C-3", 2, "first", staging_id),  # held none: inserted
        ], held_versions={"customer:C-1": 3, "customer:C-2": 5, "customer:C-3": None})
    production = await _production(database)
    assert production["customer:C-1"] == (4, {"name": "v4"})
    assert production["customer:C-2"] == (5, {"name": "v5"})
    assert production["customer:C-3"] == (2, {"name": "first"})
    assert await _queued(database) == [("customer:C-1", 4), ("customer:C-3", 2)]


@pytest.mark.sqlite_only
async def test_a_held_version_that_is_wrong_fails_the_transaction(database):
    """The caller says production holds version 3; it holds 7. The update's own guard
    refuses to go down, and the count of changed rows gives the mistake away."""
    await ingest_one(database, message(entity_id="C-1", version=7, payload={"name": "v7"}))
    staging_id = await _staging_id(database)
    with pytest.raises(RuntimeError, match="1 production rows were not at the version"):
        async with database.transaction() as session:
            await write_production(session, [_row("customer:C-1", 4, "v4", staging_id)],
                                   held_versions={"customer:C-1": 3})
    assert (await _production(database))["customer:C-1"] == (7, {"name": "v7"})


@pytest.mark.sqlite_only
async def test_a_held_absence_that_is_wrong_fails_the_transaction(database):
    await ingest_one(database, message(entity_id="C-1", version=3, payload={"name": "kept"}))
    staging_id = await _staging_id(database)
    with pytest.raises(IntegrityError, match=r"(?i)unique"):
        async with database.transaction() as session:
            await write_production(session, [_row("customer:C-1", 4, "v4", staging_id)],
                                   held_versions={"customer:C-1": None})
    assert (await _production(database))["customer:C-1"] == (3, {"name": "kept"})
