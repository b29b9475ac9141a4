"""A system's connection settings through the API: secrets are write-only (read back as
secret_set and a fingerprint), kept when a PATCH leaves them out, audited without them."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from sqlalchemy import update

from pipeline_console.delivery.vault import put_secret
from pipeline_console.models import AuditEvent, DownstreamSystem, SystemSecret
from tests.delivery.test_delivery import add_system, attempts, deliveries, ingest, run_pass
from tests.support import message

pytestmark = pytest.mark.backends


async def test_secrets_are_write_only_and_kept_on_patch(client, database) -> None:
    created = await client.post("/api/v1/systems", json={
        "name": "ledger", "transport": "http", "url": "http://127.0.0.1:9/{entity_type}/{key}",
        "method": "PUT", "auth": {"type": "basic", "username": "svc", "password": "hunter2-pw"},
        "headers": {"X-Tenant": "t1"}})
    assert created.status_code == 201, created.text
    body = created.json()
    assert "hunter2-pw" not in created.text
    assert body["auth"]["username"] == "svc"
    assert body["auth"]["password"]["secret_set"] is True
    fingerprint = body["auth"]["password"]["fingerprint"]
    assert len(fingerprint) == 12
    assert body["method"] == "PUT" and body["headers"] == {"X-Tenant": "t1"}

    patched = await client.patch("/api/v1/systems/ledger",
                                 json={"auth": {"type": "basic", "username": "svc2"}})
    assert patched.status_code == 200, patched.text
    assert patched.json()["auth"]["password"]["fingerprint"] == fingerprint

    replaced = await client.patch("/api/v1/systems/ledger", json={
        "auth": {"type": "bearer", "token": "tok-123456"}})
    assert replaced.json()["auth"]["token"]["fingerprint"] != fingerprint

    missing = await client.patch("/api/v1/systems/ledger", json={"auth": {"type": "header",
                                                                           "name": "X-Key"}})
    assert missing.status_code == 422
    assert missing.json()["errors"][0]["field"] == "auth.value"

    async with database.read() as session:
        from sqlalchemy import select
        details = [json.dumps(row.details) for row in (await session.execute(
            select(AuditEvent))).scalars()]
        stored = [row.ciphertext for row in (await session.execute(
            select(SystemSecret))).scalars()]
    assert details and not any("hunter2-pw" in d or "tok-123456" in d for d in details)
    assert stored and not any("tok-123456" in value for value in stored)


@pytest.mark.parametrize("url", ["http://user:pw@127.0.0.1:9/x", "http://127.0.0.1:9/{nope}",
                                 "http://{key}.example/x"])
async def test_urls_with_credentials_or_unknown_placeholders_are_refused(client, url) -> None:
    answer = await client.post("/api/v1/systems", json={"name": "bad", "transport": "http",
                                                        "url": url})
    assert answer.status_code == 422
    assert answer.json()["errors"][0]["field"] == "url"
    assert "pw" not in answer.text or "user:pw" not in answer.text


BASE = {"name": "named", "transport": "http", "url": "http://127.0.0.1:9/in"}


@pytest.mark.parametrize(("change", "field"), [
    ({"auth": {"type": "header", "name": "Content-Type", "value": "v-123456"}}, "auth.name"),
    ({"auth": {"type": "header", "name": "X Key", "value": "v-123456"}}, "auth.name"),
    ({"auth": {"type": "header", "name": "X-Key", "value": "v\u00e9"}}, "auth.value"),
    ({"auth": {"type": "bearer", "token": ""}}, "auth.token"),
    ({"auth": {"type": "basic", "username": "a:b", "password": "pw-123456"}}, "auth.username"),
    ({"auth": {"type": "oauth2_client_credentials", "token_url": "ftp://127.0.0.1/token",
               "client_id": "c", "client_secret": "cs-123456"}}, "auth.token_url"),
    ({"signing": {"scheme": "standard-webhooks", "secret": "whsec_short"}}, "signing.secret"),
    ({"transport": "simulated", "simulation": {"outcomes": {"success": 0}}},
     "simulation.outcomes"),
    ({"headers": {"Authorization": "Bearer x"}}, "headers.Authorization"),
])
async def test_errors_of_cross_field_and_union_checks_name_the_field_itself(
        client, change, field) -> None:
    """A model's own checks and a field inside the auth union name the field the client
    wrote, not the body, the model, or the union member's tag (auth.bearer.token)."""
    answer = await client.post("/api/v1/systems", json={**BASE, **change})
    assert answer.status_code == 422, answer.text
    assert [error["field"] for error in answer.json()["errors"]] == [field], answer.text
    assert answer.json()["detail"] == f"invalid input: {field}"
    assert "123456" not in answer.text


async def test_a_patch_nulling_a_field_that_cannot_be_null_names_it(client) -> None:
    assert (await client.post("/api/v1/systems", json=BASE)).status_code == 201
    answer = await client.patch("/api/v1/systems/named", json={"timeout_s": None})
    assert answer.status_code == 422, answer.text
    assert [error["field"] for error in answer.json()["errors"]] == ["timeout_s"]
    patched = await client.patch("/api/v1/systems/named", json={
        "auth": {"type": "header", "name": "Idempotency-Key", "value": "v-123456"}})
    assert [error["field"] for error in patched.json()["errors"]] == ["auth.name"]


UNSENDABLE_TOKENS = ["tok-123456\r\nX-Injected: 1", "tok-123456\x00", "tok-123456\u00e9",
                     "tok 123456", "tok-123456\x7f"]


@pytest.mark.parametrize("token", UNSENDABLE_TOKENS)
async def test_a_bearer_token_a_header_cannot_carry_is_refused_naming_it(client, token) -> None:
    created = await client.post("/api/v1/systems", json={
        **BASE, "auth": {"type": "bearer", "token": token}})
    assert created.status_code == 422, created.text
    assert [error["field"] for error in created.json()["errors"]] == ["auth.token"]
    assert "123456" not in created.text
    assert (await client.post("/api/v1/systems", json=BASE)).status_code == 201
    patched = await client.patch("/api/v1/systems/named", json={
        "auth": {"type": "header", "name": "X-Key", "value": token.replace(" ", "\n")}})
    # a header auth's value may hold spaces, not the rest
    assert patched.status_code == 422, patched.text
    assert [error["field"] for error in patched.json()["errors"]] == ["auth.value"]
    assert "123456" not in patched.text


class TestAStoredCredentialAHeaderCannotCarry:
    """Stored before the API checked it (or written around it): the send is a permanent
    failure, dead-lettered at once without a retry, and nothing reaches the system."""

    async def _stored(self, client, database, sink, auth: dict, value: str) -> None:
        await add_system(client, sink, max_attempts=5, auth=auth)
        async with database.transaction() as session:
            await put_secret(session, client.app.state.vault, "billing", "auth", value,
                             now=datetime.now(UTC))

    @pytest.mark.parametrize("kind", ["bearer", "header"])
    async def test_is_dead_lettered_at_once_as_unsendable(
            self, client, database, sink, kind) -> None:
        auth = ({"type": "bearer", "token": "tok-ok-123456"} if kind == "bearer" else
                {"type": "header", "name": "X-Key", "value": "tok-ok-123456"})
        await self._stored(client, database, sink, auth, "tok-123456\r\nX-Injected: 1")
        await ingest(client, message(1))
        assert (await run_pass(client))["dead_lettered"] == 1
        [delivery] = await deliveries(client)
        assert delivery["status"] == "dead_lettered"
        [attempt] = await attempts(client, delivery["id"])
        assert (attempt["classification"], attempt["rule"]) == ("permanent", "unsendable")
        assert "header value cannot carry" in attempt["error"]
        assert sink.received == []
        shown = json.dumps([delivery, attempt]) + (await client.get("/api/v1/dlq")).text
        assert "123456" not in shown

    async def test_a_header_the_http_client_refuses_is_unsendable_too(
            self, client, database, sink) -> None:
        # a static header written around the API: aiohttp's ValueError, before it sends
        await add_system(client, sink, max_attempts=5)
        async with database.transaction() as session:
            await session.execute(update(DownstreamSystem).where(
                DownstreamSystem.name == "billing").values(headers={"X-Tenant": "a\r\nX-B: 1"}))
        await ingest(client, message(1))
        assert (await run_pass(client))["dead_lettered"] == 1
        [delivery] = await deliveries(client)
        [attempt] = await attempts(client, delivery["id"])
        assert (attempt["classification"], attempt["rule"]) == ("permanent", "unsendable")
        assert attempt["error"].startswith("ValueError: ")
        assert sink.received == []
