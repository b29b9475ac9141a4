"""A system's connection settings through the API: secrets are write-only (read back as
secret_set and a fingerprint), kept when a PATCH leaves them out, audited without them."""

from __future__ import annotations

import json

import pytest

from pipeline_console.models import AuditEvent, SystemSecret

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
