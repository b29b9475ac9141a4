"""ingest_messages against real SQLite and PostgreSQL: what each decision writes."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, func, select

from pipeline_console.entity_types.service import put_entity_type
from pipeline_console.models import (
    Anomaly,
    AuditEvent,
    Correlation,
    IngestionAttempt,
    ProductionRecord,
    RecordState,
    StagingRecord,
)
from tests.support import ingest, ingest_one, message

KEY = "customer:C-100"
COUNTRY_SCHEMA = {"type": "object", "required": ["name", "country"]}


async def rows(database, model, *where):
    async with database.read() as session:
        return list((await session.execute(select(model).where(*where))).scalars())


async def production_of(database, key=KEY):
    async with database.read() as session:
        return await session.get(ProductionRecord, key)


class TestEachBranchIsRecorded:
    async def test_accept_new_stages_promotes_and_records_the_state(self, database):
        result = await ingest_one(database, message(1, {"name": "Acme"}))
        assert (result.decision, result.staging_status, result.anomaly_id) == (
            "accept_new", "promoted", None)
        [state] = await rows(database, RecordState)
        assert (state.idempotency_key, state.current_version, state.source_system) == (
            KEY, 1, "erp")
        production = await production_of(database)
        assert production.payload == {"name": "Acme"} and production.version == 1
        [attempt] = await rows(database, IngestionAttempt)
        assert attempt.id == result.attempt_id
        assert attempt.decision == "accept_new" and "first message" in attempt.reason

    async def test_accept_supersede_replaces_production(self, database):
        await ingest_one(database, message(1, {"name": "Acme"}))
        result = await ingest_one(database, message(2, {"name": "Acme GmbH"}))
        assert result.decision == "accept_supersede"
        assert (await production_of(database)).payload == {"name": "Acme GmbH"}

    async def test_skip_duplicate_writes_only_the_attempt(self, database):
        await ingest_one(database, message(1, {"name": "Acme", "country": "DE"}))
        result = await ingest_one(database, message(1, {"country": "DE", "name": "Acme"}))
        assert (result.decision, result.staging_status) == ("skip_duplicate", None)
        assert len(await rows(database, StagingRecord)) == 1
        assert len(await rows(database, IngestionAttempt)) == 2

    async def test_skip_stale_leaves_production_alone(self, database):
        await ingest_one(database, message(5, {"name": "new"}))
        result = await ingest_one(database, message(3, {"name": "old"}, source_system="crm"))
        assert result.decision == "skip_stale"
        assert "version 3 from crm is older than current version 5 (erp)" in result.reason
        assert (await production_of(database)).payload == {"name": "new"}

    async def test_quarantine_opens_an_anomaly_with_both_payloads_and_a_diff(self, database):
        await ingest_one(database, message(2, {"name": "Acme", "country": "DE"}))
        result = await ingest_one(
            database, message(2, {"name": "Acme", "country": "AT"}, source_system="crm",
                              message_id="crm-8"))
        assert result.decision == "quarantine" and result.anomaly_id is not None
        [anomaly] = await rows(database, Anomaly)
        assert anomaly.id == result.anomaly_id and anomaly.status == "open"
        assert anomaly.current_payload == {"name": "Acme", "country": "DE"}
        assert anomaly.incoming_payload == {"name": "Acme", "country": "AT"}
        assert (anomaly.current_source_system, anomaly.incoming_source_system) == ("erp", "crm")
        assert anomaly.diff == [
            {"path": "/country", "change": "changed", "current": "DE", "incoming": "AT"}]
        assert anomaly.incoming_message_id == "crm-8"
        # production is not touched
        assert (await production_of(database)).payload == {"name": "Acme", "country": "DE"}
        [attempt] = await rows(database, IngestionAttempt,
                               IngestionAttempt.decision == "quarantine")
        assert attempt.anomaly_id == anomaly.id

    async def test_a_repeat_of_the_same_conflict_joins_the_open_anomaly(self, database):
        await ingest_one(database, message(2, {"name": "A"}))
        first = await ingest_one(database, message(2, {"name": "B"}, source_system="crm"))
        again = await ingest_one(database, message(2, {"name": "B"}, source_system="crm"))
        other = await ingest_one(database, message(2, {"name": "C"}, source_system="shop"))
        assert first.anomaly_id == again.anomaly_id != other.anomaly_id
        assert len(await rows(database, Anomaly)) == 2

    async def test_a_conflict_with_a_version_accepted_in_the_same_batch(self, database):
        results = await ingest(database, message(1, {"n": 1}), message(1, {"n": 2}))
        assert [r.decision for r in results] == ["accept_new", "quarantine"]
        [anomaly] = await rows(database, Anomaly)
        assert anomaly.current_payload == {"n": 1}


class TestStagingAndPromotion:
    async def test_a_partial_record_waits_in_staging(self, database, clock):
        async with database.transaction() as session:
            await put_entity_type(session, "customer", COUNTRY_SCHEMA, actor="t", now=clock())
        result = await ingest_one(database, message(1, {"name": "Globex"}))
        assert result.staging_status == "partial"
        [staged] = await rows(database, StagingRecord)
        assert staged.status == "partial"
        assert '"country" is a required property' in staged.validation_errors[0]["message"]
        assert await production_of(database) is None

    async def test_a_newer_version_completes_a_partial_record(self, database, clock):
        async with database.transaction() as session:
            await put_entity_type(session, "customer", COUNTRY_SCHEMA, actor="t", now=clock())
        await ingest_one(database, message(1, {"name": "Globex"}))
        result = await ingest_one(database, message(2, {"name": "Globex", "country": "US"}))
        assert result.staging_status == "promoted"
        statuses = {row.version: row.status for row in await rows(database, StagingRecord)}
        assert statuses == {1: "superseded", 2: "promoted"}
        assert (await production_of(database)).version == 2

    async def test_a_partial_newer_version_never_lowers_or_replaces_production(self, database,
                                                                               clock):
        await ingest_one(database, message(1, {"name": "Acme", "country": "DE"}))
        async with database.transaction() as session:
            await put_entity_type(session, "customer", COUNTRY_SCHEMA, actor="t", now=clock())
        result = await ingest_one(database, message(2, {"name": "Acme"}))
        assert result.staging_status == "partial"
        production = await production_of(database)
        assert (production.version, production.payload) == (1, {"name": "Acme", "country": "DE"})

    async def test_promote_staging_promotes_records_a_schema_change_completed(self, database,
                                                                             clock):
        from pipeline_console.records.staging_sweep import promote_staging

        async with database.transaction() as session:
            await put_entity_type(session, "customer", COUNTRY_SCHEMA, actor="t", now=clock())
        await ingest_one(database, message(1, {"name": "Globex"}))
        await ingest_one(database, message(1, {"name": "Initech"}, entity_id="C-300"))
        async with database.transaction() as session:
            await put_entity_type(session, "customer",
                                  {"type": "object", "required": ["name"]}, actor="t", now=clock())
        async with database.transaction() as session:
            report = await promote_staging(session, now=clock(), actor="test")
        assert (report.checked, report.promoted, report.still_partial) == (2, 2, 0)
        assert (await production_of(database)).payload == {"name": "Globex"}
        async with database.transaction() as session:
            again = await promote_staging(session, now=clock(), actor="test")
        assert again.checked == 0


class TestCorrelations:
    async def test_messages_of_one_business_event_are_grouped_across_systems(self, database):
        await ingest(
            database,
            message(1, entity_id="C-1", correlation_id="evt-1"),
            message(1, {"total": 5}, entity_type="order", entity_id="O-1",
                    source_system="shop", correlation_id="evt-1"),
            message(1, entity_id="C-2", correlation_id="evt-2"),
        )
        await ingest_one(database, message(1, entity_id="C-1", correlation_id="evt-1"))
        links = await rows(database, Correlation, Correlation.correlation_id == "evt-1")
        assert sorted((link.idempotency_key, link.source_system) for link in links) == [
            ("customer:C-1", "erp"), ("order:O-1", "shop")]


class TestTheAuditTrailOfIngestion:
    async def test_accepting_and_promoting_are_audited_with_the_actor(self, database):
        await ingest_one(database, message(1), actor="erp-token")
        await ingest_one(database, message(1), actor="erp-token")  # duplicate: no state change
        events = await rows(database, AuditEvent, AuditEvent.idempotency_key == KEY)
        assert [event.action for event in events] == ["record.accepted", "record.promoted"]
        assert {event.actor for event in events} == {"erp-token"}


class TestTheWritePathIsBatched:
    async def test_statement_count_does_not_grow_with_the_batch(self, database):
        # once per process: the names of PostgreSQL's id sequences (db.allocate_ids)
        await ingest(database, message(1, entity_id="warm-up"))
        counts = []
        for size in (10, 100):
            statements = Counter()

            def count(*_args, statements=statements, **_kwargs):
                statements["n"] += 1

            event.listen(database.engine.sync_engine, "before_cursor_execute", count)
            batch = [message(1, {"i": i}, entity_id=f"N-{size}-{i}", correlation_id="evt")
                     for i in range(size)]
            batch += [message(1, {"i": i}, entity_id=f"N-{size}-{i}") for i in range(size // 2)]
            await ingest(database, *batch)
            event.remove(database.engine.sync_engine, "before_cursor_execute", count)
            counts.append(statements["n"])
        assert counts[0] == counts[1], counts
        assert counts[1] <= 16, counts


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), min_size=1, max_size=10),
       st.integers(1, 4))
async def test_every_message_gets_one_attempt_row_and_production_holds_the_highest_version(
    database, steps, batch_size
):
    """Random interleavings for one key, in random batch sizes, on the real database."""
    entity_id = f"P-{abs(hash((tuple(steps), batch_size)))}"
    key = f"customer:{entity_id}"
    async with database.read() as session:
        before = await session.scalar(select(func.count()).select_from(IngestionAttempt)
                                      .where(IngestionAttempt.idempotency_key == key))
    bodies = [message(version, {"p": p}, entity_id=entity_id) for version, p in steps]
    results = []
    for start in range(0, len(bodies), batch_size):
        results += await ingest(database, *bodies[start:start + batch_size])
    async with database.read() as session:
        attempts = await session.scalar(select(func.count()).select_from(IngestionAttempt)
                                        .where(IngestionAttempt.idempotency_key == key))
        production = await session.get(ProductionRecord, key)
        state = await session.get(RecordState, key)
    assert attempts - before == len(bodies)
    if before == 0:
        accepted = [b for b, r in zip(bodies, results, strict=True)
                    if r.decision in ("accept_new", "accept_supersede")]
        highest = max(accepted, key=lambda b: b["version"])
        assert production.version == state.current_version == highest["version"]
        assert production.payload == highest["payload"]
