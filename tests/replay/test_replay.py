"""Replay end to end against a real HTTP server, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from pipeline_console.db import Database, create_engine
from pipeline_console.delivery.service import Deliverer
from pipeline_console.delivery.transports import Transports
from pipeline_console.replay.service import execute_replay
from tests.delivery.test_delivery import add_system, attempts, deliveries, ingest, run_pass
from tests.sink import Answer
from tests.support import message


async def dead_letter(client, sink, *entity_ids: str, **system_settings) -> list[dict]:
    """Deliveries that the system refused (400): open DLQ entries."""
    sink.answer(Answer(400, body="nope"))
    await add_system(client, sink, **system_settings)
    await ingest(client, *[message(1, {"n": e}, entity_id=e) for e in entity_ids])
    await run_pass(client)
    return (await client.get("/api/v1/dlq?status=open")).json()["items"]


async def replay(client, **body):
    return await client.post("/api/v1/replays", json={"reason": "billing fixed it", **body})


class TestValidation:
    async def test_a_mixed_batch_is_refused_whole_stored_as_rejected_and_sends_nothing(
            self, client, sink):
        [entry] = await dead_letter(client, sink, "A")
        sent = len(sink.received)
        response = await replay(client, items=[{"dlq_id": entry["id"]}, {"dlq_id": 999},
                                               {"key": "customer:NOPE", "system": "billing"}])
        assert response.status_code == 409
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert [item["eligible"] for item in problem["items"]] == [True, False, False]
        assert "dead letter 999 does not exist" in problem["items"][1]["reason"]
        assert "not in production" in problem["items"][2]["reason"]
        stored = (await client.get(f"/api/v1/replays/{problem['replay_id']}")).json()
        assert stored["status"] == "rejected"
        executed = await client.post(f"/api/v1/replays/{problem['replay_id']}/execute")
        assert executed.status_code == 409
        assert len(sink.received) == sent

    async def test_a_replay_into_an_open_circuit_is_refused(self, client, sink):
        [entry] = await dead_letter(client, sink, "A")
        await client.post("/api/v1/circuits/billing/open", json={"reason": "maintenance"})
        response = await replay(client, items=[{"dlq_id": entry["id"]}])
        assert response.status_code == 409
        assert "circuit of billing is open" in response.json()["items"][0]["reason"]

    async def test_an_older_version_is_never_replayed(self, client, sink):
        [entry] = await dead_letter(client, sink, "A")
        sink.answer(Answer(200))
        await ingest(client, message(2, {"n": "A2"}, entity_id="A"))
        response = await replay(client, items=[{"dlq_id": entry["id"]}])
        assert "not the current production version (2)" in response.json()["items"][0]["reason"]

    async def test_a_delivered_version_is_replayed_only_when_asked_explicitly(self, client,
                                                                              sink):
        await add_system(client, sink)
        await ingest(client, message(1))
        await run_pass(client)
        item = {"key": "customer:C-100", "system": "billing"}
        refused = await replay(client, items=[item])
        assert "set allow_delivered" in refused.json()["items"][0]["reason"]
        accepted = await replay(client, items=[item], allow_delivered=True)
        assert accepted.status_code == 201
        done = (await client.post(f"/api/v1/replays/{accepted.json()['id']}/execute")).json()
        assert done["status"] == "completed"
        assert sink.keys_received() == {"customer:C-100:1": 2}

    async def test_a_filter_is_expanded_to_items_and_shown_back(self, client, sink):
        await dead_letter(client, sink, "A", "B", "C")
        response = await replay(client, filter={"system": "billing",
                                                "reason_contains": "HTTP 400"})
        assert response.status_code == 201
        body = response.json()
        assert body["status"] == "validated"
        assert sorted(item["key"] for item in body["items"]) == [
            "customer:A", "customer:B", "customer:C"]
        assert body["selection"]["filter"]["system"] == "billing"

    @pytest.mark.parametrize("body", [
        {"items": [{"dlq_id": 1}]},  # no reason
        {"reason": "x"},  # neither items nor filter
        {"reason": "x", "items": [{"key": "customer:A"}]},  # key without system
        {"reason": "x", "items": [{"dlq_id": 1, "key": "customer:A", "system": "b"}]},
    ])
    async def test_malformed_requests_are_422(self, client, body):
        assert (await client.post("/api/v1/replays", json=body)).status_code == 422


class TestExecution:
    async def test_a_dead_letter_replayed_after_the_fix_is_delivered_and_closed(self, client,
                                                                               sink):
        [entry] = await dead_letter(client, sink, "A")
        sink.answer(Answer(200))
        created = (await replay(client, items=[{"dlq_id": entry["id"]}])).json()
        done = (await client.post(f"/api/v1/replays/{created['id']}/execute")).json()
        assert done["status"] == "completed"
        [execution] = done["executions"]
        assert execution["outcome"] == "delivered"
        [closed] = (await client.get("/api/v1/dlq")).json()["items"]
        assert closed["status"] == "closed"
        [delivery] = await deliveries(client)
        original, replayed = await attempts(client, delivery["id"])
        assert replayed["id"] == execution["delivery_attempt_id"]
        assert (replayed["trigger"], replayed["actor"]) == ("replay", "tester (admin)")
        # the very same request an original delivery carries: same headers, same body
        assert replayed["request"] == original["request"]
        assert sink.received[0].body == sink.received[1].body
        assert sink.received[0].headers["Idempotency-Key"] == sink.received[1].headers[
            "Idempotency-Key"]

    async def test_executing_twice_sends_once(self, client, sink):
        [entry] = await dead_letter(client, sink, "A")
        sink.answer(Answer(200))
        created = (await replay(client, items=[{"dlq_id": entry["id"]}])).json()
        first = (await client.post(f"/api/v1/replays/{created['id']}/execute")).json()
        second = (await client.post(f"/api/v1/replays/{created['id']}/execute")).json()
        assert first["executions"] == second["executions"]
        assert len(sink.received) == 2  # the original try and one replay

    async def test_executing_at_the_same_time_from_two_processes_sends_once(
            self, client, sink, settings):
        entries = await dead_letter(client, sink, "A", "B", "C", "D")
        sink.answer(Answer(200, delay_s=0.1))
        created = (await replay(client, items=[{"dlq_id": e["id"]} for e in entries])).json()
        databases = [Database(create_engine(settings)) for _ in range(2)]
        try:
            async with Transports.open() as transports:
                runs = [execute_replay(Deliverer(db, transports, client.app.state.clock,
                                                 worker_id=f"process-{n}"),
                                       created["id"], actor="operator")
                        for n, db in enumerate(databases)]
                await asyncio.gather(*runs)
        finally:
            for db in databases:
                await db.dispose()
        done = (await client.get(f"/api/v1/replays/{created['id']}")).json()
        assert done["status"] == "completed" and len(done["executions"]) == 4
        assert sink.keys_received() == {f"customer:{e}:1": 2 for e in "ABCD"}

    async def test_a_replay_that_fails_again_lands_back_in_the_dlq_through_the_normal_path(
            self, client, sink):
        [entry] = await dead_letter(client, sink, "A")
        created = (await replay(client, items=[{"dlq_id": entry["id"]}])).json()
        done = (await client.post(f"/api/v1/replays/{created['id']}/execute")).json()
        assert done["status"] == "failed"
        assert done["executions"][0]["outcome"] == "dead_lettered"
        entries = (await client.get("/api/v1/dlq")).json()["items"]
        # a new entry, written by the normal path; it replaces (closes) the replayed one
        assert [e["status"] for e in entries] == ["closed", "open"]
        assert entries[1]["attempt_id"] == done["executions"][0]["delivery_attempt_id"]

    async def test_eligibility_is_checked_again_at_execution(self, client, sink):
        [entry] = await dead_letter(client, sink, "A")
        created = (await replay(client, items=[{"dlq_id": entry["id"]}])).json()
        await client.post("/api/v1/circuits/billing/open", json={"reason": "maintenance"})
        done = (await client.post(f"/api/v1/replays/{created['id']}/execute")).json()
        assert done["status"] == "failed" and done["executions"] == []
        assert done["items"][0]["reason"].startswith("at execution: the circuit")


class TestTheExecutionLogIsProof:
    async def test_every_execution_row_references_exactly_one_replay_attempt(self, client,
                                                                            sink, database):
        entries = await dead_letter(client, sink, "A", "B")
        sink.answer(Answer(200))
        created = (await replay(client, items=[{"dlq_id": e["id"]} for e in entries])).json()
        await client.post(f"/api/v1/replays/{created['id']}/execute")
        async with database.read() as session:
            rows = (await session.execute(text(
                "SELECT e.id, a.trigger, a.delivery_id, e.delivery_id AS expected "
                "FROM replay_executions e JOIN delivery_attempts a "
                "ON a.id = e.delivery_attempt_id"))).all()
        assert len(rows) == 2
        assert all(row.trigger == "replay" and row.delivery_id == row.expected for row in rows)

    @pytest.mark.parametrize("attempt", ["NULL", "scheduled", "another_deliverys"])
    async def test_the_database_refuses_an_execution_without_a_replay_attempt(
            self, client, sink, database, attempt):
        entries = {entry["idempotency_key"]: entry
                   for entry in await dead_letter(client, sink, "A", "B")}
        sink.answer(Answer(200))
        other = (await replay(client, items=[{"dlq_id": entries["customer:B"]["id"]}])).json()
        await client.post(f"/api/v1/replays/{other['id']}/execute")  # B's replay attempt
        created = (await replay(client, items=[{"dlq_id": entries["customer:A"]["id"]}])).json()
        a_delivery = next(d for d in await deliveries(client)
                          if d["idempotency_key"] == "customer:A")
        [scheduled] = await attempts(client, a_delivery["id"])
        b_delivery = next(d for d in await deliveries(client)
                          if d["idempotency_key"] == "customer:B")
        b_replay = (await attempts(client, b_delivery["id"]))[-1]
        assert b_replay["trigger"] == "replay"
        attempt_id = {"NULL": "NULL", "scheduled": str(scheduled["id"]),
                      "another_deliverys": str(b_replay["id"])}[attempt]
        delivery = a_delivery
        trigger = "'replay'"  # even claiming the trigger does not help: the pair must exist
        with pytest.raises(IntegrityError):
            async with database.transaction() as session:
                await session.execute(text(
                    "INSERT INTO replay_executions (request_id, item_id, delivery_id, "
                    "delivery_attempt_id, attempt_trigger, outcome, executed_by, executed_at) "
                    f"VALUES ({created['id']}, {created['items'][0]['id']}, {delivery['id']}, "
                    f"{attempt_id}, {trigger}, 'delivered', 'forger', CURRENT_TIMESTAMP)"))


class TestReviewFindings:
    async def test_a_dead_letter_whose_payload_was_corrected_since_is_not_replayed(
            self, client, sink):
        [entry] = await dead_letter(client, sink, "A")
        conflict = (await ingest(client, message(1, {"n": "fixed"}, entity_id="A",
                                                 source_system="crm")))[0]
        await client.post(f"/api/v1/anomalies/{conflict['anomaly_id']}/resolve",
                          json={"resolution": "accept_incoming", "note": "crm is right"})
        response = await replay(client, items=[{"dlq_id": entry["id"]}])
        assert response.status_code == 409
        assert "no longer production's" in response.json()["items"][0]["reason"]

    async def test_a_dead_letter_replayed_by_two_requests_is_sent_once(self, client, sink):
        [entry] = await dead_letter(client, sink, "A")
        sink.answer(Answer(200))
        first = (await replay(client, items=[{"dlq_id": entry["id"]}])).json()
        second = (await replay(client, items=[{"dlq_id": entry["id"]}])).json()
        assert (await client.post(f"/api/v1/replays/{first['id']}/execute")).json()[
            "status"] == "completed"
        again = (await client.post(f"/api/v1/replays/{second['id']}/execute")).json()
        assert again["status"] == "failed"
        assert "closed, not open" in again["items"][0]["reason"]
        assert sink.keys_received() == {"customer:A:1": 2}

    async def test_a_key_never_queued_for_the_system_is_sent_once(self, client, sink):
        await ingest(client, message(1))
        await add_system(client, sink)  # subscribed after the promotion: no delivery yet
        created = (await replay(client, items=[{"key": "customer:C-100",
                                                "system": "billing"}])).json()
        assert (await run_pass(client))["claimed"] == 0
        done = (await client.post(f"/api/v1/replays/{created['id']}/execute")).json()
        assert done["status"] == "completed"
        assert (await run_pass(client))["claimed"] == 0
        assert sink.keys_received() == {"customer:C-100:1": 1}

    async def test_all_or_nothing_holds_at_execution(self, client, sink):
        entries = await dead_letter(client, sink, "A", "B")
        created = (await replay(client, items=[{"dlq_id": e["id"]} for e in entries])).json()
        sink.answer(Answer(200))
        await ingest(client, message(2, {"n": "B2"}, entity_id="B"))
        sent = len(sink.received)
        done = (await client.post(f"/api/v1/replays/{created['id']}/execute")).json()
        assert done["status"] == "failed" and done["executions"] == []
        assert {item["status"] for item in done["items"]} == {"refused"}
        assert len(sink.received) == sent

    async def test_filters_work_after_a_failed_replay_and_ignore_case(self, client, sink):
        await dead_letter(client, sink, "A")
        first = (await replay(client, filter={"system": "billing"})).json()
        await client.post(f"/api/v1/replays/{first['id']}/execute")  # fails again: 400
        again = await replay(client, filter={"system": "billing", "reason_contains": "http 400"})
        assert again.status_code == 201 and len(again.json()["items"]) == 1

    async def test_an_empty_filter_is_refused_and_stored(self, client, sink):
        await add_system(client, sink)
        response = await replay(client, filter={"system": "billing"})
        assert response.status_code == 409
        assert "selects nothing" in response.json()["detail"]
        stored = (await client.get(f"/api/v1/replays/{response.json()['replay_id']}")).json()
        assert stored["status"] == "rejected"

    @pytest.mark.parametrize("bound", [{"from": "0001-01-01T00:00:00+01:00"},
                                       {"to": "9999-12-31T23:59:59-01:00"}])
    async def test_filter_times_without_a_utc_equivalent_are_422(self, client, sink, bound):
        await add_system(client, sink)
        response = await replay(client, filter={"system": "billing", **bound})
        assert response.status_code == 422

    async def test_an_interrupted_execution_is_finished_from_the_attempt_log(
            self, client, sink, database):
        [entry] = await dead_letter(client, sink, "A")
        sink.answer(Answer(200))
        created = (await replay(client, items=[{"dlq_id": entry["id"]}])).json()
        from pipeline_console.replay import service as replay_service

        real_log = replay_service._log_execution

        async def crash(*_args, **_kwargs):
            raise RuntimeError("the process died after sending")

        replay_service._log_execution = crash
        try:
            stuck = (await client.post(f"/api/v1/replays/{created['id']}/execute",
                                       )).json()
        finally:
            replay_service._log_execution = real_log
        assert stuck["status"] == "executing"  # sent, but not yet in the execution log
        done = (await client.post(f"/api/v1/replays/{created['id']}/execute")).json()
        assert done["status"] == "completed"
        assert done["executions"][0]["outcome"] == "delivered"
        assert sink.keys_received() == {"customer:A:1": 2}


async def test_listing_replays_costs_the_same_queries_for_one_or_many(client, sink, database):
    from sqlalchemy import event

    entries = await dead_letter(client, sink, "A", "B", "C", "D")

    async def count_queries() -> int:
        seen = []
        listener = lambda *_args, **_kwargs: seen.append(1)  # noqa: E731
        event.listen(database.engine.sync_engine, "before_cursor_execute", listener)
        try:
            assert (await client.get("/api/v1/replays")).status_code == 200
        finally:
            event.remove(database.engine.sync_engine, "before_cursor_execute", listener)
        return len(seen)

    await replay(client, items=[{"dlq_id": entries[0]["id"]}])
    one = await count_queries()
    for entry in entries[1:]:
        await replay(client, items=[{"dlq_id": entry["id"]}])
    assert await count_queries() == one
    listed = (await client.get("/api/v1/replays")).json()["items"]
    assert [len(r["items"]) for r in listed] == [1, 1, 1, 1]


async def test_the_dead_letter_list_filters_by_reason_and_time(client, sink, clock):
    await dead_letter(client, sink, "A")
    clock.advance(hours=2)
    sink.answer(Answer(422, body="bad vat number"))
    await ingest(client, message(1, {"n": "B"}, entity_id="B"))
    await run_pass(client)

    async def ids(query):
        response = await client.get(f"/api/v1/dlq?{query}")
        assert response.status_code == 200, response.text
        return [entry["idempotency_key"] for entry in response.json()["items"]]

    assert await ids("reason_contains=VAT") == ["customer:B"]
    assert await ids("reason_contains=HTTP%20400") == ["customer:A"]
    assert await ids("from=2026-11-24T11:00:00Z") == ["customer:B"]
    assert await ids("to=2026-11-24T11:00:00Z") == ["customer:A"]
    assert await ids("reason_contains=%25") == []  # a LIKE wildcard is matched literally
    refused = await client.get("/api/v1/dlq?from=yesterday")
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "from"


async def test_reason_contains_folds_every_letter_on_both_databases(client, sink):
    sink.answer(Answer(422, body="KONTO ÜBERZOGEN"))
    await add_system(client, sink)
    await ingest(client, message(1))
    await run_pass(client)
    found = (await client.get("/api/v1/dlq?reason_contains=überzogen")).json()["items"]
    assert [entry["idempotency_key"] for entry in found] == ["customer:C-100"]


class TestAgainWithTheEligibleItems:
    async def test_a_refused_replay_asked_again_sends_only_its_eligible_items(
            self, client, sink):
        entries = await dead_letter(client, sink, "A", "B")
        sink.answer(Answer(200))
        refused = await replay(client, items=[{"dlq_id": entries[0]["id"]}, {"dlq_id": 999},
                                              {"dlq_id": entries[1]["id"]}])
        assert refused.status_code == 409
        source = refused.json()["replay_id"]
        sent = len(sink.received)

        again = await client.post(f"/api/v1/replays/{source}/eligible",
                                  json={"reason": "billing fixed it; 999 was a typo"})
        assert again.status_code == 201, again.text
        request = again.json()
        assert request["status"] == "validated" and request["id"] != source
        assert [item["dlq_id"] for item in request["items"]] == [
            entries[0]["id"], entries[1]["id"]]
        assert request["selection"]["from_replay"] == source
        executed = await client.post(f"/api/v1/replays/{request['id']}/execute")
        assert executed.json()["status"] == "completed", executed.text
        assert sorted(r.body["entity_id"] for r in sink.received[sent:]) == ["A", "B"]
        # the rejected request stays as it was
        assert (await client.get(f"/api/v1/replays/{source}")).json()["status"] == "rejected"

    async def test_only_a_rejected_request_with_an_eligible_item_is_asked_again(
            self, client, sink):
        [entry] = await dead_letter(client, sink, "A")
        validated = (await replay(client, items=[{"dlq_id": entry["id"]}])).json()
        none_eligible = (await replay(client, items=[{"dlq_id": 999}])).json()
        for replay_id, words in ((validated["id"], "not rejected"),
                                 (none_eligible["replay_id"], "none of the items"),
                                 (123456, "does not exist")):
            answer = await client.post(f"/api/v1/replays/{replay_id}/eligible",
                                       json={"reason": "again"})
            assert answer.status_code in (404, 409), answer.text
            assert words in answer.json()["detail"], answer.text
        missing_reason = await client.post(f"/api/v1/replays/{validated['id']}/eligible",
                                           json={})
        assert missing_reason.status_code == 422
        assert missing_reason.json()["errors"][0]["field"] == "reason"
