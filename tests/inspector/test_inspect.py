"""GET /api/v1/inspect/{key} on SQLite and PostgreSQL."""

from __future__ import annotations

import json

from sqlalchemy import event, text

from pipeline_console.inspector.api import inspect_model
from pipeline_console.inspector.service import inspect_record
from tests.delivery.test_delivery import add_system, ingest, run_pass
from tests.sink import Answer
from tests.support import message

SECTIONS = ["state", "attempts", "staging", "production", "correlations", "anomalies",
            "deliveries", "delivery_attempts", "dlq", "ambiguous", "circuits", "replays",
            "replay_executions", "audit", "timeline"]


async def inspect(client, key="customer%3AC-100", **params):
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return await client.get(f"/api/v1/inspect/{key}?{query}")


async def test_every_section_is_present_even_when_empty(client):
    await ingest(client, message(1))
    body = (await inspect(client)).json()
    assert all(section in body for section in SECTIONS)
    assert body["deliveries"] == [] and body["replays"] == [] and body["dlq"] == []
    assert body["state"]["current_version"] == 1


async def test_an_unknown_key_is_404(client):
    response = await inspect(client, "customer%3ANOPE")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


async def same_as_the_models(database, body, key="customer:C-100", limit=200):
    """The route writes the long sections straight from the rows with orjson: the answer is
    the JSON the pydantic models would have given (as FastAPI dumps them, by alias)."""
    async with database.read() as session:
        found = await inspect_record(session, key, limit=limit)
        expected = json.loads(inspect_model(found, key, limit).model_dump_json(by_alias=True))
    assert body == expected


async def test_a_record_through_every_branch_and_queue_is_explained(client, sink, clock,
                                                                      database):
    sink.answer(Answer(400, body="nope"), Answer(200))
    await add_system(client, sink)
    await ingest(client, message(1, {"name": "A"}, correlation_id="evt-1", message_id="m1"))
    clock.advance(seconds=1)
    await ingest(client, message(1, {"total": 5}, entity_type="order", entity_id="O-1",
                                 source_system="shop", correlation_id="evt-1"))
    clock.advance(seconds=1)
    await run_pass(client)  # customer v1: 400, dead-lettered; order: delivered
    clock.advance(seconds=1)
    await ingest(client, message(1, {"name": "A"}, message_id="m1"))  # duplicate
    clock.advance(seconds=1)
    await ingest(client, message(3, {"name": "A3"}, source_system="erp"))  # supersede
    clock.advance(seconds=1)
    await ingest(client, message(2, {"name": "A2"}, source_system="crm"))  # stale
    clock.advance(seconds=1)
    conflict = (await ingest(client, message(3, {"name": "X"}, source_system="crm")))[0]
    clock.advance(seconds=1)
    await client.post(f"/api/v1/anomalies/{conflict['anomaly_id']}/resolve",
                      json={"resolution": "keep_current", "note": "erp is the master"})
    clock.advance(seconds=1)
    await run_pass(client)  # customer v3 delivered
    clock.advance(seconds=1)
    await client.post("/api/v1/messages", json={**message(-1), "message_id": "bad"})
    replay = await client.post("/api/v1/replays", json={
        "reason": "try", "items": [{"key": "customer:C-100", "system": "billing"}],
        "allow_delivered": True})
    await client.post(f"/api/v1/replays/{replay.json()['id']}/execute")

    body = (await inspect(client)).json()
    await same_as_the_models(database, body)
    assert [a["decision"] for a in body["attempts"]] == [
        "accept_new", "skip_duplicate", "accept_supersede", "skip_stale", "quarantine",
        "rejected"]
    assert body["production"]["version"] == 3
    assert {(c["idempotency_key"], c["sibling"]) for c in body["correlations"]} == {
        ("customer:C-100", False), ("order:O-1", True)}
    assert body["anomalies"][0]["resolution"] == "keep_current"
    assert [d["status"] for d in body["deliveries"]] == ["dead_lettered", "delivered"]
    assert [a["trigger"] for a in body["delivery_attempts"]] == [
        "scheduled", "scheduled", "replay"]
    assert [d["status"] for d in body["dlq"]] == ["open"]
    assert [c["system"] for c in body["circuits"]] == ["billing"]
    assert body["replays"][0]["request"]["status"] == "completed"
    assert body["replay_executions"][0]["delivery_attempt_id"] == body["delivery_attempts"][
        2]["id"]

    timeline = body["timeline"]
    assert [entry["at"] for entry in timeline] == sorted(entry["at"] for entry in timeline)
    sentences = "\n".join(entry["summary"] for entry in timeline)
    for expected in [
        "accept_new (message m1): version 1 from erp is the first message for this key",
        "skip_duplicate (message m1): version 1 from erp has the same payload",
        "accept_supersede: version 3 from erp is newer than current version 1 (erp)",
        "skip_stale: version 2 from crm is older than current version 3 (erp)",
        "quarantine: version 3 from crm has a different payload",
        "anomaly resolved (keep_current): erp is the master (by tester (admin))",
        "permanent by rule 4xx — HTTP 400",
        "delivery to billing dead-lettered",
        "success by rule 2xx — HTTP 200",
        "rejected (message bad)",
        "replay 1 requested by tester (admin) (try)",
    ]:
        assert expected in sentences, expected


async def test_the_number_of_queries_does_not_grow_with_the_history(client, database):
    async def count_queries() -> int:
        statements = []

        def record(*args, **kwargs):
            statements.append(1)

        event.listen(database.engine.sync_engine, "before_cursor_execute", record)
        try:
            assert (await inspect(client)).status_code == 200
        finally:
            event.remove(database.engine.sync_engine, "before_cursor_execute", record)
        return len(statements)

    await ingest(client, message(1))
    short = await count_queries()
    for version in range(2, 40):
        await ingest(client, message(version, {"v": version}), message(version, {"v": version}))
    assert await count_queries() == short


async def test_a_long_history_is_capped_with_its_total(client, database):
    for version in range(1, 13):
        await ingest(client, message(version, {"v": version}))
    body = (await inspect(client, limit=5)).json()
    assert [a["version"] for a in body["attempts"]] == [8, 9, 10, 11, 12]
    assert body["totals"]["attempts"] == 12 and body["limit"] == 5
    await same_as_the_models(database, body, limit=5)


async def test_a_payload_orjson_cannot_write_is_answered_through_the_models(client, database):
    big = 2**70  # beyond orjson's 64-bit integers: the route falls back to the models
    await ingest(client, message(1, {"ratio": 0.1, "nested": [{"x": None}]}))
    async with database.transaction() as session:  # intake refuses it; a row may hold it
        await session.execute(text("UPDATE staging_records SET payload = :payload"),
                              {"payload": f'{{"big": {big}}}'})
    response = await inspect(client)
    assert response.status_code == 200
    body = response.json()
    assert body["staging"][0]["payload"]["big"] == big
    await same_as_the_models(database, body)


async def test_inspect_by_correlation_id_shows_the_business_event(client):
    await ingest(client, message(1, entity_id="C-1", correlation_id="evt-9", message_id="e-1"),
                 message(1, {"total": 3}, entity_type="order", entity_id="O-1",
                         source_system="shop", correlation_id="evt-9"),
                 message(1, entity_id="C-2", correlation_id="other"))
    body = (await client.get("/api/v1/inspect?correlation_id=evt-9")).json()
    assert [r["idempotency_key"] for r in body["records"]] == ["customer:C-1", "order:O-1"]
    assert sorted(p["idempotency_key"] for p in body["production"]) == [
        "customer:C-1", "order:O-1"]
    assert len(body["attempts"]) == 2
    assert any("accept_new (message e-1)" in e["summary"] for e in body["timeline"])


async def test_inspect_by_message_id_finds_every_attempt_that_carried_it(client):
    await ingest(client, message(1, message_id="m-7"), message(1, message_id="m-7"),
                 message(1, entity_id="X", message_id="m-8"))
    body = (await client.get("/api/v1/inspect?message_id=m-7")).json()
    assert [a["decision"] for a in body["attempts"]] == ["accept_new", "skip_duplicate"]
    assert [r["idempotency_key"] for r in body["records"]] == ["customer:C-100"]


async def test_inspect_by_reference_needs_exactly_one_and_an_unknown_one_is_404(client):
    assert (await client.get("/api/v1/inspect")).status_code == 422
    assert (await client.get("/api/v1/inspect?correlation_id=a&message_id=b")).status_code == 422
    assert (await client.get("/api/v1/inspect?correlation_id=nope")).status_code == 404


async def test_payloads_are_answered_as_stored_and_as_the_models_would(client, database):
    """The long sections' payloads are spliced in as the database's JSON text: the answer
    must still be what the models give, for text beyond ASCII, escapes and nesting."""
    payload = {"name": "Zoë \U0001F600 \"quoted\" \\ back", "n": 9007199254740991,
               "x": -0.5, "e": 1e-7, "nested": {"l": [1.5, None, True, {"k": []}]}}
    await ingest(client, message(1, payload))
    await ingest(client, message(2, {**payload, "name": "line\nbreak\u2028"}))
    response = await inspect(client)
    assert response.status_code == 200
    body = response.json()
    await same_as_the_models(database, body)
    assert [row["payload"] for row in body["staging"]] == [
        payload, {**payload, "name": "line\nbreak\u2028"}]
