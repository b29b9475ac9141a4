"""POST /api/v1/messages and /messages/batch over HTTP (in-process ASGI)."""

from __future__ import annotations

import orjson
import pytest
from sqlalchemy import event, select

from pipeline_console.models import IngestionAttempt, RecordState
from tests.support import message

PROBLEM = "application/problem+json"


async def attempts(database, decision=None):
    query = select(IngestionAttempt).order_by(IngestionAttempt.id)
    if decision:
        query = query.where(IngestionAttempt.decision == decision)
    async with database.read() as session:
        return list((await session.execute(query)).scalars())


class TestOneMessage:
    async def test_the_response_matches_the_contract(self, client):
        response = await client.post("/api/v1/messages", json=message(
            3, correlation_id="evt-7781", message_id="erp-991",
            occurred_at="2026-11-24T10:03:00Z"))
        assert response.status_code == 200
        body = response.json()
        assert {k: body[k] for k in ("decision", "idempotency_key", "version", "staging_status",
                                     "anomaly_id")} == {
            "decision": "accept_new", "idempotency_key": "customer:C-100", "version": 3,
            "staging_status": "promoted", "anomaly_id": None}
        assert isinstance(body["attempt_id"], int)

    async def test_all_five_branches_over_http(self, client):
        decisions = []
        for body in (message(1, {"a": 1}), message(1, {"a": 1}), message(2, {"a": 2}),
                     message(1, {"a": 0}), message(2, {"a": 3})):
            decisions.append((await client.post("/api/v1/messages", json=body)).json()["decision"])
        assert decisions == ["accept_new", "skip_duplicate", "accept_supersede", "skip_stale",
                             "quarantine"]


class TestBadInputGetsAClearProblemAndIsRecorded:
    @pytest.mark.parametrize(
        ("body", "field"),
        [
            (message(-1), "version"),
            ({k: v for k, v in message().items() if k != "entity_id"}, "entity_id"),
            (message("3"), "version"),
            (message(1.5), "version"),
            (message(2**63), "version"),
            ({**message(), "payload": [1, 2]}, "payload"),
            ({**message(), "unknown": 1}, "unknown"),
            ({**message(), "entity_id": "C-\x00-1"}, "entity_id"),
            ({**message(), "source_system": "bad system!"}, "source_system"),
            ({**message(), "occurred_at": "yesterday"}, "occurred_at"),
            ({**message(), "payload": {"big": 2**60}}, "payload"),
        ],
        ids=["negative-version", "missing-field", "string-version", "float-version",
             "version-too-big", "payload-not-object", "unknown-field", "nul-in-id",
             "bad-source-name", "bad-timestamp", "unhashable-number"],
    )
    async def test_a_malformed_message_gets_422_naming_the_field(self, client, database, body,
                                                                 field):
        response = await client.post("/api/v1/messages", content=orjson.dumps(body),
                                     headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == PROBLEM
        problem = response.json()
        assert {"type", "title", "status", "detail", "errors"} <= set(problem)
        assert field in [error["field"] for error in problem["errors"]]
        [attempt] = await attempts(database, "rejected")
        assert attempt.id == problem["attempt_id"]
        assert attempt.raw_body and attempt.errors
        assert "\x00" not in attempt.raw_body

    async def test_broken_json_is_422_and_recorded_with_its_raw_body(self, client, database):
        response = await client.post("/api/v1/messages", content=b'{"source_system": "erp",',
                                     headers={"content-type": "application/json"})
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "body"
        [attempt] = await attempts(database, "rejected")
        assert attempt.raw_body == '{"source_system": "erp",'

    async def test_a_twelve_megabyte_payload_is_413_and_recorded_truncated(self, client,
                                                                           database):
        body = message(1, {"blob": "x" * 12_000_000})
        response = await client.post("/api/v1/messages", content=orjson.dumps(body),
                                     headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert response.headers["content-type"] == PROBLEM
        [attempt] = await attempts(database, "rejected")
        assert len(attempt.raw_body) <= 4097
        async with database.read() as session:
            assert (await session.execute(select(RecordState))).first() is None

    async def test_a_payload_nested_too_deep_is_refused(self, client):
        deep: dict = {}
        cursor = deep
        for _ in range(40):
            cursor["x"] = {}
            cursor = cursor["x"]
        response = await client.post("/api/v1/messages", json=message(1, deep))
        assert response.status_code == 422
        assert response.json()["errors"][0]["type"] == "payload_too_deep"

    async def test_a_version_written_as_5_0_is_5_but_5_5_true_and_5_in_quotes_are_not(
            self, client):
        accepted = await client.post("/api/v1/messages", json=message(5.0))
        assert accepted.status_code == 200 and accepted.json()["version"] == 5
        for wrong in (5.5, True, "5"):
            response = await client.post("/api/v1/messages", json=message(wrong))
            assert response.status_code == 422, wrong
            assert response.json()["errors"][0]["field"] == "version"

    async def test_an_overlong_string_in_a_payload_is_refused_naming_where(self, client,
                                                                           database):
        payload = {"name": "Acme", "notes": ["short", "x" * 70_000]}
        response = await client.post("/api/v1/messages", json=message(1, payload))
        assert response.status_code == 422
        [error] = response.json()["errors"]
        assert (error["field"], error["type"]) == ("payload/notes/1", "payload_string_too_long")
        long_key = await client.post("/api/v1/messages/batch", json={"messages": [
            message(1, {"k" * 70_000: 1}, entity_id="K")]})
        [result] = long_key.json()["results"]
        assert result["error"]["errors"][0]["type"] == "payload_string_too_long"
        assert len(await attempts(database, "rejected")) == 2  # recorded, as every rejection
        exactly = await client.post("/api/v1/messages", json=message(1, {"s": "y" * 65_536}))
        assert exactly.status_code == 200

    async def test_a_rejected_message_keeps_what_could_be_read_of_it(self, client, database):
        await client.post("/api/v1/messages", json=message(-4, message_id="m-1"))
        [attempt] = await attempts(database, "rejected")
        assert (attempt.idempotency_key, attempt.message_id, attempt.version) == (
            "customer:C-100", "m-1", None)


class TestBatches:
    async def test_one_bad_message_never_fails_the_others(self, client, database):
        response = await client.post("/api/v1/messages/batch", json={"messages": [
            message(1, entity_id="A"), message(-1, entity_id="B"), message(1, entity_id="C")]})
        assert response.status_code == 200
        results = response.json()["results"]
        assert [r["index"] for r in results] == [0, 1, 2]
        assert results[0]["decision"] == results[2]["decision"] == "accept_new"
        assert results[1]["error"]["status"] == 422
        assert results[1]["error"]["errors"][0]["field"] == "version"
        assert len(await attempts(database)) == 3

    async def test_results_equal_sending_the_messages_one_by_one(self, client):
        bodies = [message(1, {"a": 1}), message(2, {"a": 2}), message(2, {"a": 2}),
                  message(1, {"a": 9}), message(2, {"b": 1})]
        batch = (await client.post("/api/v1/messages/batch",
                                   json={"messages": bodies})).json()["results"]
        assert [r["decision"] for r in batch] == [
            "accept_new", "accept_supersede", "skip_duplicate", "skip_stale", "quarantine"]
        assert [r["staging_status"] for r in batch] == ["promoted", "promoted", None, None, None]

    async def test_too_many_messages_is_413_and_nothing_is_ingested(self, client, database,
                                                                    settings):
        count = settings.max_batch_messages + 1
        response = await client.post("/api/v1/messages/batch", json={
            "messages": [message(1, entity_id=f"E-{i}") for i in range(count)]})
        assert response.status_code == 413
        assert f"{count} messages" in response.json()["detail"]
        recorded = await attempts(database)
        assert [a.decision for a in recorded] == ["rejected"]

    @pytest.mark.parametrize("body", [b"[]", b'{"messages": 3}', b"{", b'{"items": []}'])
    async def test_a_body_without_a_list_of_messages_is_422(self, client, body):
        response = await client.post("/api/v1/messages/batch", content=body,
                                     headers={"content-type": "application/json"})
        assert response.status_code == 422
        assert response.headers["content-type"] == PROBLEM

    async def test_an_empty_batch_is_an_empty_answer(self, client):
        response = await client.post("/api/v1/messages/batch", json={"messages": []})
        assert response.json() == {"results": []}


class TestTheCommitHappensBeforeTheResponse:
    async def test_a_failing_commit_is_a_5xx_and_nothing_is_stored(self, client, database):
        def refuse_commit(_connection):
            raise RuntimeError("disk full (simulated at commit)")

        event.listen(database.engine.sync_engine, "commit", refuse_commit)
        try:
            response = await client.post("/api/v1/messages", json=message(1))
        finally:
            event.remove(database.engine.sync_engine, "commit", refuse_commit)
        assert response.status_code == 500
        assert response.headers["content-type"] == PROBLEM
        assert await attempts(database) == []
