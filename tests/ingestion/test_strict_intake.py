"""Strict intake of POST /api/v1/messages and /messages/batch (API.md, "Answers every route
gives"): only application/json, no repeated object key anywhere, occurred_at as an RFC 3339
string with a zone. Each refusal is a problem+json naming the field, recorded as `rejected`
in the attempt log with the body's excerpt, and nothing is staged."""

from __future__ import annotations

import orjson
import pytest
from sqlalchemy import func, select

from pipeline_console.app import create_app
from pipeline_console.config import Settings
from pipeline_console.models import IngestionAttempt, RecordState, StagingRecord
from tests.support import message

PROBLEM = "application/problem+json"
JSON = "application/json"
SINGLE, BATCH = "/api/v1/messages", "/api/v1/messages/batch"


def raw(body: dict) -> bytes:
    return orjson.dumps(body)


def batch(*bodies: dict) -> bytes:
    return orjson.dumps({"messages": list(bodies)})


def with_member(body: bytes, member: bytes) -> bytes:
    """`body` (a JSON object) with one more member written at its end, as text: how a
    repeated key reaches the server (no Python dict can hold one)."""
    return body[:-1] + b"," + member + b"}"


ONE = raw(message(1))
LINES = raw(message(1, {"lines": [{"sku": "A-1", "qty": 2}]})).replace(
    b'"qty":2', b'"qty":2,"sku":"B-2"')


# (route, content type or None for none, body, status, field named, error type)
RULES = [
    # 1. the content type
    pytest.param(SINGLE, "text/plain", ONE, 415, "content-type", "unsupported_media_type",
                 id="text-plain"),
    pytest.param(SINGLE, None, ONE, 415, "content-type", "unsupported_media_type",
                 id="no-content-type"),
    pytest.param(SINGLE, "application/x-www-form-urlencoded", ONE, 415, "content-type",
                 "unsupported_media_type", id="form"),
    pytest.param(SINGLE, "application/merge-patch+json", ONE, 415, "content-type",
                 "unsupported_media_type", id="json-suffix"),
    pytest.param(SINGLE, "application/json; charset=iso-8859-1", ONE, 415, "content-type",
                 "unsupported_media_type", id="other-charset"),
    pytest.param(SINGLE, "application/jsonx", ONE, 415, "content-type",
                 "unsupported_media_type", id="json-prefix"),
    pytest.param(BATCH, "text/plain", batch(message(1)), 415, "content-type",
                 "unsupported_media_type", id="batch-text-plain"),
    pytest.param(BATCH, None, batch(message(1)), 415, "content-type",
                 "unsupported_media_type", id="batch-no-content-type"),
    # 2. a repeated object key, anywhere
    pytest.param(SINGLE, JSON, with_member(raw(message(1)), b'"version":2'), 422, "version",
                 "duplicate_key", id="top-level"),
    pytest.param(SINGLE, JSON, LINES, 422, "payload/lines/0/sku", "duplicate_key",
                 id="in-a-list-in-the-payload"),
    pytest.param(SINGLE, JSON, raw(message(1, {"a": 1})).replace(
        b'"a":1', b'"a":1,"\\u0061":2'), 422, "payload/a", "duplicate_key",
        id="equal-after-unescaping"),
    pytest.param(SINGLE, JSON, raw(message(1, {"a/b": {"~": 1}})).replace(
        b'"~":1', b'"~":1, "~" : 2'), 422, "payload/a~1b/~0", "duplicate_key",
        id="pointer-escaped"),
    pytest.param(SINGLE, JSON, raw(message(1, {"note": '":"', "n": 1})).replace(
        b'"n":1', b'"n":1,"n":1'), 422, "payload/n", "duplicate_key",
        id="same-value-twice"),
    pytest.param(BATCH, JSON, batch(*(message(1, entity_id=f"E-{n}") for n in range(3)),
                                    message(1, {"x": 1}, entity_id="E-3")).replace(
        b'"x":1', b'"x":1,"x":2'), 422, "messages/3/payload/x", "duplicate_key",
        id="batch-in-an-item"),
    pytest.param(BATCH, JSON, with_member(batch(message(1)), b'"messages":[]'), 422,
                 "messages", "duplicate_key", id="batch-top-level"),
    # 3. occurred_at: an RFC 3339 string with a zone
    pytest.param(SINGLE, JSON, raw(message(1, occurred_at=12345)), 422, "occurred_at",
                 "rfc3339_datetime", id="unix-number"),
    pytest.param(SINGLE, JSON, raw(message(1, occurred_at=1.7e9)), 422, "occurred_at",
                 "rfc3339_datetime", id="unix-float"),
    pytest.param(SINGLE, JSON, raw(message(1, occurred_at="12345")), 422, "occurred_at",
                 "rfc3339_datetime", id="unix-in-a-string"),
    pytest.param(SINGLE, JSON, raw(message(1, occurred_at="2026-11-24T10:03:00")), 422,
                 "occurred_at", "rfc3339_datetime", id="no-zone"),
    pytest.param(SINGLE, JSON, raw(message(1, occurred_at="2026-11-24")), 422, "occurred_at",
                 "rfc3339_datetime", id="date-only"),
    pytest.param(SINGLE, JSON, raw(message(1, occurred_at="2026-11-24T10:03Z")), 422,
                 "occurred_at", "rfc3339_datetime", id="no-seconds"),
    pytest.param(SINGLE, JSON, raw(message(1, occurred_at="2026-11-24 10:03:00Z")), 422,
                 "occurred_at", "rfc3339_datetime", id="space-for-T"),
    pytest.param(SINGLE, JSON, raw(message(1, occurred_at="2026-11-24T10:03:00+0100")), 422,
                 "occurred_at", "rfc3339_datetime", id="offset-without-colon"),
    pytest.param(SINGLE, JSON, raw(message(1, occurred_at="2026-11-24T10:03:00Z\n")), 422,
                 "occurred_at", "rfc3339_datetime", id="trailing-newline"),
    pytest.param(BATCH, JSON, batch(message(1, occurred_at=12345)), 200, "occurred_at",
                 "rfc3339_datetime", id="batch-item-unix-number"),
]


async def attempts(database) -> list[IngestionAttempt]:
    async with database.read() as session:
        return list((await session.execute(
            select(IngestionAttempt).order_by(IngestionAttempt.id))).scalars())


async def staged(database) -> int:
    async with database.read() as session:
        staging = (await session.execute(select(func.count()).select_from(StagingRecord)))
        states = (await session.execute(select(func.count()).select_from(RecordState)))
        return staging.scalar_one() + states.scalar_one()


async def post(client, route: str, content_type: str | None, body: bytes):
    headers = {} if content_type is None else {"content-type": content_type}
    return await client.post(route, content=body, headers=headers)


class TestEachRuleIsAProblemNamingTheFieldAndIsRecordedAsRejected:
    @pytest.mark.parametrize(("route", "content_type", "body", "status", "field", "kind"),
                             RULES)
    async def test_the_rule(self, client, database, route, content_type, body, status, field,
                            kind):
        response = await post(client, route, content_type, body)
        assert response.status_code == status, response.text
        if status == 200:  # one invalid message of a batch: its own problem, in its place
            [result] = response.json()["results"]
            problem = result["error"]
            assert problem["status"] == 422
        else:
            assert response.headers["content-type"] == PROBLEM
            problem = response.json()
            assert problem["status"] == status
        assert {"type", "title", "status", "detail", "errors", "attempt_id"} <= set(problem)
        assert [(error["field"], error["type"]) for error in problem["errors"]][:1] == [
            (field, kind)], problem
        if status == 415:
            assert problem["errors"][0]["location"] == "header"
            assert response.headers["accept"] == JSON
        [attempt] = await attempts(database)
        assert (attempt.id, attempt.decision) == (problem["attempt_id"], "rejected")
        assert attempt.errors == problem["errors"]
        assert attempt.raw_body  # the body's excerpt, as for every rejection
        assert await staged(database) == 0


class TestWhatStaysAccepted:
    @pytest.mark.parametrize("content_type", [
        "application/json", "application/json; charset=utf-8", "Application/JSON",
        "application/json;charset=UTF-8", "application/json ; charset=\"utf-8\""])
    async def test_application_json_with_or_without_a_utf8_charset(self, client, content_type):
        response = await post(client, SINGLE, content_type, ONE)
        assert response.status_code == 200, response.text
        response = await post(client, BATCH, content_type, batch(message(2)))
        assert response.status_code == 200, response.text
        assert "decision" in response.json()["results"][0]

    @pytest.mark.parametrize("occurred_at", [
        "2026-11-24T10:03:00Z", "2026-11-24t10:03:00z", "2026-11-24T10:03:00.5+01:00",
        "2026-11-24T10:03:00.123456789-05:30", "2026-11-24T10:03:00-00:00"])
    async def test_rfc3339_times_with_a_zone(self, client, occurred_at):
        response = await post(client, SINGLE, JSON, raw(message(1, occurred_at=occurred_at)))
        assert response.status_code == 200, response.text

    async def test_strings_that_look_like_keys_are_not_keys(self, client):
        tricky = {"a": 'x":"a', "b": "\\", "c": 'q\\":', "d": ["\"a\":", {"e": "\":\""}],
                  "\u00e9": 1, "é2": '"é":', "": "", "k\"": 1, "k": 2}
        response = await post(client, SINGLE, JSON, raw(message(1, tricky)))
        assert response.status_code == 200, response.text


def test_the_openapi_document_tells_the_same():
    document = create_app(Settings()).openapi()
    for path in (SINGLE, BATCH):
        unsupported = document["paths"][path]["post"]["responses"]["415"]
        assert PROBLEM in unsupported["content"] and "Accept" in unsupported["headers"]
    occurred_at = document["components"]["schemas"]["MessageIn"]["properties"]["occurred_at"]
    [as_text] = [choice for choice in occurred_at["anyOf"] if choice.get("type") == "string"]
    assert as_text["format"] == "date-time" and as_text["pattern"].startswith("^")
