"""Tokens: ingest tokens scoped to their sources, unscoped ones flagged until replaced, and
token rows that never change in place (the database refuses it)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from pipeline_console.auth.tokens import (
    create_token,
    hash_token,
    new_token,
    revoke_token,
    scope_of,
)
from pipeline_console.errors import InvalidInput
from pipeline_console.models import ApiToken, AuditEvent
from tests.conftest import make_token
from tests.test_operations import run_cli


async def legacy_ingest_token(database, clock, name: str) -> str:
    """An ingest token as made before scoping existed (sources SQL NULL): tokens create
    refuses to make one now."""
    plain = new_token()
    async with database.transaction() as session:
        session.add(ApiToken(name=name, role="ingest", token_hash=hash_token(plain),
                             prefix=plain[:10], created_at=clock.now, created_by="old-cli",
                             sources=None))
    return plain


def cli(database_url, *args):
    return run_cli(database_url, "tokens", *args)


class TestCreatingTokens:
    async def test_an_ingest_token_needs_a_source(self, database_url):
        result = await asyncio.to_thread(cli, database_url, "create", "--role", "ingest",
                                         "--name", "shop-ingest")
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1
        assert "--source" in result.stderr and result.stdout == ""

    async def test_only_ingest_tokens_take_sources(self, database_url):
        result = await asyncio.to_thread(cli, database_url, "create", "--role", "operator",
                                         "--name", "alice", "--source", "erp")
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1 and "ingest" in result.stderr
        assert "may post from any source" in result.stderr
        viewer = await asyncio.to_thread(cli, database_url, "create", "--role", "viewer",
                                         "--name", "auditor", "--source", "erp")
        assert viewer.returncode == 2 and "may not post messages at all" in viewer.stderr

    async def test_a_source_must_be_a_source_name(self, database_url):
        result = await asyncio.to_thread(cli, database_url, "create", "--role", "ingest",
                                         "--name", "odd", "--source", "no spaces please")
        assert result.returncode == 2 and "source system name" in result.stderr

    async def test_sources_are_stored_sorted_and_audited(self, database_url, database):
        result = await asyncio.to_thread(cli, database_url, "create", "--role", "ingest",
                                         "--name", "hub", "--source", "shop", "--source",
                                         "crm", "--source", "shop")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1].startswith("pc_")
        async with database.read() as session:
            row = await session.scalar(select(ApiToken).where(ApiToken.name == "hub"))
            event = await session.scalar(select(AuditEvent).where(
                AuditEvent.action == "token.created", AuditEvent.subject_id == "hub"))
        assert row.sources == ["crm", "shop"]
        assert event.details["sources"] == ["crm", "shop"]

    async def test_unscoped_is_sql_null_not_json_null(self, database, clock):
        await make_token(database, "operator", name="op", now=clock.now)
        async with database.engine.connect() as connection:
            nulls = (await connection.execute(text(
                "SELECT count(*) FROM api_tokens WHERE sources IS NULL"))).scalar_one()
        assert nulls == 1

    async def test_the_service_refuses_too(self, database, clock):
        with pytest.raises(InvalidInput, match="source"):
            async with database.transaction() as session:
                await create_token(session, name="x", role="ingest", actor="t", now=clock.now)
        assert scope_of("ingest", ["b", "a", "b"]) == ["a", "b"]
        assert scope_of("admin", None) is None


class TestUnscopedTokensAreFlagged:
    async def test_tokens_list_says_unscoped(self, database_url, database, clock):
        await legacy_ingest_token(database, clock, "old-connector")
        await make_token(database, "ingest", name="erp-ingest", now=clock.now,
                         sources=["erp"])
        await make_token(database, "viewer", name="reader", now=clock.now)
        result = await asyncio.to_thread(cli, database_url, "list")
        assert result.returncode == 0, result.stderr
        lines = {line.split()[0]: line for line in result.stdout.splitlines()}
        assert "UNSCOPED" in lines["old-connector"]
        assert "UNSCOPED" not in lines["erp-ingest"] and "sources erp" in lines["erp-ingest"]
        assert "UNSCOPED" not in lines["reader"]

    async def test_the_api_lists_them_without_secrets(self, client, database, clock):
        legacy = await legacy_ingest_token(database, clock, "old-connector")
        await make_token(database, "ingest", name="erp-ingest", now=clock.now,
                         sources=["erp"])
        everyone = await client.get("/api/v1/tokens")
        assert everyone.status_code == 200
        names = {item["name"]: item for item in everyone.json()["items"]}
        assert set(names) >= {"old-connector", "erp-ingest", "tester"}
        assert names["erp-ingest"]["sources"] == ["erp"]
        assert not names["erp-ingest"]["unscoped"] and names["old-connector"]["unscoped"]
        assert legacy not in everyone.text and hash_token(legacy) not in everyone.text
        assert "token_hash" not in everyone.text
        flagged = (await client.get("/api/v1/tokens?unscoped=true")).json()
        assert [item["name"] for item in flagged["items"]] == ["old-connector"]
        first = (await client.get("/api/v1/tokens?limit=1")).json()
        assert len(first["items"]) == 1 and first["next_cursor"]
        viewer = await make_token(database, "viewer", name="reader", now=clock.now)
        refused = await client.get("/api/v1/tokens",
                                   headers={"Authorization": f"Bearer {viewer}"})
        assert refused.status_code == 403

    async def test_the_dashboard_flags_them_until_replaced(self, client, database, clock,
                                                           database_url):
        async def card():
            items = (await client.get("/api/v1/dashboard")).json()["items"]
            return [item for item in items if item["name"] == "unscoped_ingest_tokens"]

        assert await card() == []
        await legacy_ingest_token(database, clock, "old-a")
        await legacy_ingest_token(database, clock, "old-b")
        [flag] = await card()
        assert flag["count"] == 2 and flag["severity"] == "warning"
        assert flag["title"] == "2 ingest tokens have no source scope: replace them"
        listed = (await client.get(flag["path"])).json()["items"]
        assert len(listed) == 2
        page = await client.get("/tokens?unscoped=true")
        assert page.status_code == 200 and "old-a" in page.text and "unscoped" in page.text
        for name in ("old-a", "old-b"):
            revoked = await asyncio.to_thread(cli, database_url, "revoke", name)
            assert revoked.returncode == 0, revoked.stderr
        assert await card() == []

    async def test_the_console_page_lists_every_token_with_its_scope(self, client, database,
                                                                     clock):
        await make_token(database, "ingest", name="shop-ingest", now=clock.now,
                         sources=["shop"])
        page = await client.get("/tokens")
        assert page.status_code == 200
        assert "shop-ingest" in page.text and "shop" in page.text
        assert "style=" not in page.text and "<script>" not in page.text


CHANGES = {
    "role": "UPDATE api_tokens SET role = 'admin' WHERE name = 'erp-ingest'",
    "name": "UPDATE api_tokens SET name = 'someone' WHERE name = 'erp-ingest'",
    "hash": "UPDATE api_tokens SET token_hash = 'x' WHERE name = 'erp-ingest'",
    "sources": "UPDATE api_tokens SET sources = NULL WHERE name = 'erp-ingest'",
    "delete": "DELETE FROM api_tokens WHERE name = 'erp-ingest'",
}


class TestTokenRowsNeverChangeInPlace:
    @pytest.mark.parametrize("change", list(CHANGES))
    async def test_the_database_refuses(self, database, clock, change):
        await make_token(database, "ingest", name="erp-ingest", now=clock.now,
                         sources=["erp"])
        with pytest.raises(DBAPIError, match="api_tokens rows"):
            async with database.engine.begin() as connection:
                await connection.execute(text(CHANGES[change]))
        async with database.read() as session:
            row = await session.scalar(select(ApiToken).where(ApiToken.name == "erp-ingest"))
        assert (row.role, row.sources) == ("ingest", ["erp"])

    async def test_one_revocation_and_no_second(self, database, clock):
        await make_token(database, "viewer", name="reader", now=clock.now)
        async with database.transaction() as session:
            await revoke_token(session, "reader", actor="t", now=clock.now)
        with pytest.raises(DBAPIError, match="api_tokens rows"):
            async with database.engine.begin() as connection:
                await connection.execute(text(
                    "UPDATE api_tokens SET revoked_by = 'someone else' WHERE name = 'reader'"))

    async def test_a_new_role_is_a_revocation_and_a_new_token(self, database, clock):
        await make_token(database, "viewer", name="alice", now=clock.now)
        async with database.transaction() as session:
            await revoke_token(session, "alice", actor="t", now=clock.now)
            await create_token(session, name="alice", role="operator", actor="t",
                               now=clock.now)
        async with database.read() as session:
            rows = list((await session.execute(select(ApiToken).where(
                ApiToken.name == "alice").order_by(ApiToken.id))).scalars())
        assert [(row.role, row.revoked_at is None) for row in rows] == [
            ("viewer", False), ("operator", True)]
