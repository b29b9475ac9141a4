"""Inputs found by review that once produced a 500 or lost a batch; each must now be a 4xx
(or succeed), on both databases."""

from __future__ import annotations

from datetime import timedelta, timezone

import orjson
import pytest

from pipeline_console.audit.service import AuditEntry, append_audit, verify_audit_chain
from tests.support import message

JSON = {"content-type": "application/json"}


async def post_batch(client, *bodies, raw: bytes | None = None):
    content = raw if raw is not None else orjson.dumps({"messages": list(bodies)})
    return await client.post("/api/v1/messages/batch", content=content, headers=JSON)


def nested(levels: int) -> dict:
    node: dict = {}
    for _ in range(levels):
        node = {"x": node}
    return node


class TestBatchesSurviveOddMessages:
    async def test_a_conflict_with_an_empty_current_payload(self, client):
        response = await post_batch(client, message(1, {}), message(1, {"a": 1}))
        assert response.status_code == 200
        assert [r["decision"] for r in response.json()["results"]] == ["accept_new",
                                                                      "quarantine"]
        anomaly = (await client.get("/api/v1/anomalies")).json()["items"][0]
        assert anomaly["current_payload"] == {}

    async def test_a_rejected_message_nested_too_deep_to_serialize_again(self, client,
                                                                         database):
        raw = b'{"messages": [' + orjson.dumps(message(1)) + b", " + (
            b'{"x": ' * 300 + b"1" + b"}" * 300) + b"]}"
        response = await post_batch(client, raw=raw)
        assert response.status_code == 200
        results = response.json()["results"]
        assert results[0]["decision"] == "accept_new" and results[1]["error"]["status"] == 422

    @pytest.mark.parametrize("occurred_at", ["9999-12-31T23:59:59-23:59",
                                             "0001-01-01T00:00:00+01:00"])
    async def test_a_time_outside_the_utc_range_is_refused_alone(self, client, occurred_at):
        response = await post_batch(client, message(1, entity_id="OK"),
                                    message(1, occurred_at=occurred_at))
        assert response.status_code == 200
        ok, bad = response.json()["results"]
        assert ok["decision"] == "accept_new"
        assert bad["error"]["errors"][0]["field"] == "occurred_at"


class TestLargeNumbers:
    @pytest.mark.parametrize("version", [2**53 + 1, 2**63 - 1])
    async def test_versions_beyond_double_precision_are_accepted_and_audited(self, client,
                                                                             version):
        response = await client.post("/api/v1/messages", json=message(version))
        assert response.status_code == 200 and response.json()["version"] == version
        assert (await client.get("/api/v1/audit/verify")).json()["ok"] is True

    async def test_an_integer_beyond_64_bits_in_a_payload_is_refused_not_rounded(self,
                                                                               client):
        raw = orjson.dumps(message(1)).replace(b'"name":"Acme"',
                                               b'"n":100000000000000000001')
        response = await client.post("/api/v1/messages", content=raw, headers=JSON)
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "payload"

    async def test_a_large_float_literal_is_a_number_like_any_other(self, client):
        raw = orjson.dumps(message(1)).replace(b'"name":"Acme"', b'"n":1e20')
        assert (await client.post("/api/v1/messages", content=raw,
                                  headers=JSON)).status_code == 200


class TestSchemas:
    @pytest.mark.parametrize(("schema", "field"), [
        ({"$ref": "#/$defs/nope"}, "schema/$ref"),
        ({"$ref": "http://127.0.0.1:1/remote.json"}, "schema/$ref"),
        ({"properties": {"a": {"$ref": "other.json#/x"}}}, "schema/properties/a/$ref"),
        (nested(100), "schema"),
    ], ids=["dangling-ref", "remote-ref", "relative-ref", "too-deep"])
    async def test_a_schema_that_cannot_be_evaluated_is_refused(self, client, schema, field):
        response = await client.put("/api/v1/entity-types/customer", json={"schema": schema})
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == field

    @pytest.mark.parametrize("raw", [b'{"schema": {"maximum": NaN}}',
                                     b'{"schema": {"maximum": 100000000000000000000}}',
                                     b'{"schema": {"title": "\\ud800"}}'],
                             ids=["nan", "huge-int", "lone-surrogate"])
    async def test_a_schema_that_is_not_canonical_json_is_refused(self, client, raw):
        response = await client.put("/api/v1/entity-types/customer", content=raw,
                                    headers=JSON)
        assert response.status_code == 422

    async def test_a_local_reference_works(self, client):
        schema = {"$defs": {"name": {"type": "string"}},
                  "properties": {"name": {"$ref": "#/$defs/name"}}}
        assert (await client.put("/api/v1/entity-types/customer",
                                 json={"schema": schema})).status_code == 201
        response = await client.post("/api/v1/messages", json=message(1, {"name": 5}))
        assert response.json()["staging_status"] == "partial"


@pytest.mark.parametrize("path", ["/api/v1/systems", "/api/v1/replays"])
async def test_a_body_that_is_not_utf8_is_a_422_not_a_400(client, path):
    """Found by Schemathesis' stateful phase (issue 19): FastAPI answered 400."""
    response = await client.post(path, content=b"\xff\x37\xfe", headers=JSON)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"][0]["field"] == "body"


class TestUrls:
    @pytest.mark.parametrize(("url", "field"), [
        ("/api/v1/records?entity_type=%00", "entity_type"),
        ("/api/v1/attempts?message_id=a%00b", "message_id"),
        ("/api/v1/records/a%00b", "path"),
        ("/api/v1/correlations/a%00b", "path"),
        ("/api/v1/entity-types/a%00", "path"),
    ])
    async def test_nul_anywhere_in_a_url_is_422(self, client, url, field):
        response = await client.get(url)
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == field

    @pytest.mark.parametrize("url", [
        "/api/v1/records?cursor=ImFcdTAwMDAi",  # the string "a\u0000"
        "/api/v1/anomalies?cursor=OTIyMzM3MjAzNjg1NDc3NTgwOA",  # 2**63
        "/api/v1/anomalies?cursor=LTE",  # -1
    ])
    async def test_a_forged_cursor_is_422(self, client, url):
        response = await client.get(url)
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "cursor"

    @pytest.mark.parametrize("anomaly_id", ["9223372036854775808", "0", "-1"])
    async def test_an_id_outside_the_64_bit_range_is_422(self, client, anomaly_id):
        assert (await client.get(f"/api/v1/anomalies/{anomaly_id}")).status_code == 422
        response = await client.post(f"/api/v1/anomalies/{anomaly_id}/resolve",
                                     json={"resolution": "keep_current", "note": "x"})
        assert response.status_code == 422


async def test_accept_incoming_of_a_partial_payload_is_promoted_once_complete(client):
    await client.put("/api/v1/entity-types/customer", json={
        "schema": {"type": "object", "required": ["name"]}})
    await client.post("/api/v1/messages", json=message(1, {"name": "Acme"}))
    conflict = await client.post("/api/v1/messages", json=message(1, {"nick": "X"},
                                                                  source_system="crm"))
    await client.post(f"/api/v1/anomalies/{conflict.json()['anomaly_id']}/resolve",
                      json={"resolution": "accept_incoming", "note": "crm is right"})
    await client.put("/api/v1/entity-types/customer", json={"schema": None})
    run = (await client.post("/api/v1/jobs/promote_staging/run")).json()["result"]
    assert run["promoted"] == 1
    record = (await client.get("/api/v1/records/customer%3AC-100")).json()
    assert record["production"]["payload"] == {"nick": "X"}
    assert record["production"]["payload_hash"] == record["payload_hash"]
    assert (await client.post("/api/v1/jobs/promote_staging/run")).json()["result"][
        "checked"] == 0


async def test_an_audit_time_in_another_zone_verifies(database, clock):
    async with database.transaction() as session:
        await append_audit(session, [AuditEntry("t", "t", "1", {})], actor="a",
                           now=clock().astimezone(timezone(timedelta(hours=2))))
    async with database.read() as session:
        assert (await verify_audit_chain(session)).ok


SQL_METACHARACTERS = ["' OR '1'='1", "'; DROP TABLE audit_events; --", '" OR ""="',
                      "%", "_", "\\", "1) UNION SELECT token_hash FROM api_tokens --"]


@pytest.mark.parametrize("hostile", SQL_METACHARACTERS)
async def test_sql_metacharacters_in_filters_are_only_text(client, hostile):
    """Every filter is a bound parameter: hostile text finds nothing and breaks nothing."""
    await client.post("/api/v1/messages", json=message(1, entity_id="SAFE"))
    query = {"reason_contains": hostile}
    for path, params in (("/api/v1/dlq", query), ("/api/v1/anomalies", {"key": hostile}),
                         ("/api/v1/jobs/runs", {"job": hostile[:64]}),
                         ("/search", {"q": hostile}), ("/audit", {"action": hostile}),
                         ("/dlq", {"reason": hostile})):
        response = await client.get(path, params=params)
        assert response.status_code in (200, 422), (path, response.status_code)
        if response.headers["content-type"].startswith("application/json"):
            assert response.json().get("items", []) == [], path
    names = await client.get("/api/v1/records", params={"source_system": hostile})
    assert names.status_code in (200, 422)
    audit = (await client.get("/api/v1/audit/verify")).json()
    assert audit["ok"] is True  # the audit table is still there and intact
    assert (await client.get("/api/v1/records")).json()["items"]  # and so are the records
