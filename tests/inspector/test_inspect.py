"""GET /api/v1/inspect/{key} on SQLite and PostgreSQL."""

from __future__ import annotations

import json

from sqlalchemy import event, text

from pipeline_console.inspector.api import inspect_model
from pipeline_console.inspector.service import inspect_record
from tests.delivery.test_delivery import add_system, deliveries, ingest, run_pass
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


async def audit_of(client, key="customer:C-100"):
    items = (await client.get(f"/api/v1/audit?key={key}&limit=500")).json()["items"]
    return [(event["action"], event["details"]) for event in items]


class TestVersionsSupersededWithinTheirBatch:
    """A batch carrying versions 1, 2 and 3 of one key writes production once, with version 3:
    versions 1 and 2 were never promoted and never delivered, and every record says so."""

    async def test_the_inspector_tells_the_story_and_nothing_claims_a_promotion(
        self, client, sink, database
    ):
        await add_system(client, sink)
        results = await ingest(client, *(message(v, {"name": f"v{v}", "country": "DE"})
                                          for v in (1, 2, 3)))
        # the answers are the ones the messages would have got one by one (API.md)
        assert [r["staging_status"] for r in results] == ["promoted"] * 3
        await run_pass(client)

        body = (await inspect(client)).json()
        await same_as_the_models(database, body)
        assert [(row["version"], row["status"], row["promoted_at"]) for row in body["staging"]
                ][:2] == [(1, "superseded", None), (2, "superseded", None)]
        assert (body["staging"][2]["version"], body["staging"][2]["status"]) == (3, "promoted")
        assert body["production"]["version"] == 3
        assert [(d["version"], d["status"]) for d in body["deliveries"]] == [(3, "delivered")]
        assert [request.body["version"] for request in sink.received] == [3]

        audit = [(event["action"], event["details"]) for event in body["audit"]]
        assert audit == await audit_of(client)
        assert [details["version"] for action, details in audit
                if action == "record.promoted"] == [3]
        assert [(details["version"], details["superseded_by"], details["within_batch"],
                 details["staged_as"]) for action, details in audit
                if action == "record.superseded"] == [(1, 2, True, "complete"),
                                                      (2, 3, True, "complete")]
        assert [(details["version"], details["staging_status"]) for action, details in audit
                if action == "record.accepted"] == [(1, "complete"), (2, "complete"),
                                                    (3, "promoted")]

        sentences = [entry["summary"] for entry in body["timeline"]]
        for version, by in ((1, 2), (2, 3)):
            assert any(s.startswith(f"version {version} (complete) superseded by version {by}: "
                                    "it arrived in the same batch, so version "
                                    f"{version} was never promoted to production and never "
                                    "delivered") for s in sentences), sentences
            assert not any(f"version {version} promoted" in s for s in sentences)
        said_promoted = [s for s in sentences if s.endswith("staged as promoted")]
        assert len(said_promoted) == 1 and "version 3" in said_promoted[0]
        assert sum("superseded it before it was promoted" in s for s in sentences) == 2

        record = (await client.get("/api/v1/records/customer%3AC-100")).json()
        assert (record["production"]["version"], record["staging"]["version"],
                record["staging"]["status"]) == (3, 3, "promoted")
        staged = (await client.get("/api/v1/staging?key=customer:C-100")).json()
        assert [(row["version"], row["status"]) for row in staged["items"]] == [
            (1, "superseded"), (2, "superseded"), (3, "promoted")]

        page = (await client.get("/records/customer:C-100")).text
        staging = page[page.index('id="staging"'):page.index('id="attempts"')]
        for version, by in ((1, 2), (2, 3)):
            assert (f"<td>{version}</td><td>erp</td><td>superseded by version {by} within the "
                    "same batch: never promoted, never delivered") in staging, staging
        assert "<td>3</td><td>erp</td><td>promoted" in staging

    async def test_a_version_promoted_before_the_batch_stays_promoted(self, client, sink):
        await add_system(client, sink)
        await ingest(client, message(1, {"name": "v1", "country": "DE"}))
        await ingest(client, message(2, {"name": "v2", "country": "DE"}),
                     message(3, {"name": "v3", "country": "DE"}))
        audit = await audit_of(client)
        assert [d["version"] for a, d in audit if a == "record.promoted"] == [1, 3]
        assert [(d["version"], d["superseded_by"]) for a, d in audit
                if a == "record.superseded"] == [(2, 3)]
        statuses = {d["version"]: d["status"] for d in await deliveries(client)}
        # version 1 was promoted and queued; version 3's promotion superseded its delivery
        assert statuses == {1: "superseded", 3: "pending"}

    async def test_a_partial_row_superseded_by_a_later_batch_is_audited(self, client):
        await client.put("/api/v1/entity-types/customer",
                         json={"schema": {"required": ["country"]}})
        await ingest(client, message(1, {"name": "P"}))
        await ingest(client, message(2, {"name": "P", "country": "DE"}))
        audit = await audit_of(client)
        [(_, superseded)] = [(a, d) for a, d in audit if a == "record.superseded"]
        assert (superseded["version"], superseded["superseded_by"], superseded["within_batch"],
                superseded["staged_as"]) == (1, 2, False, "partial")
        timeline = [e["summary"] for e in (await inspect(client)).json()["timeline"]]
        assert any("version 1 (partial) superseded by version 2: it was accepted while "
                   "version 1 was still partial in staging" in s for s in timeline)
