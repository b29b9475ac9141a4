"""Audit anchors (issue 19, finding 6): the chain alone verifies after its newest rows are
deleted, or after a row is rewritten and everything after it rehashed. A head kept outside
the database (an anchor) catches both."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import replace
from datetime import datetime

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from structlog.testing import capture_logs

from pipeline_console.audit.chain import (
    ChainHead,
    anchor_mismatch,
    parse_anchor,
    row_hash,
)
from pipeline_console.audit.service import chained_content, verify_audit_chain
from pipeline_console.models import AuditEvent
from tests.audit.test_audit import drop_protection, fill
from tests.test_operations import run_cli

HEAD_LINE = re.compile(r"head (\d+):([0-9a-f]{64})")


async def verify(database, anchor=None):
    async with database.read() as session:
        return await verify_audit_chain(session, anchor=anchor)


async def head_of(client) -> str:
    head = (await client.get("/api/v1/audit/verify")).json()["head"]
    return f"{head['id']}:{head['hash']}"


async def rehash_from(database, first_id: int, changed_details: dict) -> None:
    """What an attacker with write access does: rewrite row `first_id`, then recompute the
    hash of it and of every row after it, so the chain verifies again."""
    await drop_protection(database)
    async with database.read() as session:
        rows = list((await session.execute(
            select(AuditEvent).where(AuditEvent.id >= first_id).order_by(AuditEvent.id)
        )).scalars())
        before = await session.get(AuditEvent, first_id - 1) if first_id > 1 else None
    prev = before.row_hash if before else "0" * 64
    async with database.engine.begin() as connection:
        for index, row in enumerate(rows):
            content = chained_content(row)
            if index == 0:
                content = replace(content, details=changed_details)
            new_hash = row_hash(prev, content)
            await connection.execute(
                text("UPDATE audit_events SET details = :details, prev_hash = :prev, "
                     "row_hash = :hash WHERE id = :id"),
                {"details": json.dumps(content.details), "prev": prev, "hash": new_hash,
                 "id": row.id})
            prev = new_hash


class TestTheHead:
    async def test_the_api_reports_the_newest_row(self, client, database, clock):
        empty = (await client.get("/api/v1/audit/verify")).json()
        # the client's own token made one row (token.created)
        await fill(database, clock, 3)
        body = (await client.get("/api/v1/audit/verify")).json()
        async with database.read() as session:
            newest = await session.scalar(select(AuditEvent).order_by(AuditEvent.id.desc()))
        assert body["ok"] and body["head"] == {"id": newest.id, "hash": newest.row_hash}
        assert body["checked"] == newest.id and body["anchor"] is None
        assert empty["head"]["id"] == 1

    async def test_an_empty_log_has_no_head(self, database):
        report = await verify(database)
        assert report.ok and report.checked == 0 and report.head is None

    async def test_the_cli_prints_the_head_last(self, client, database, clock, database_url):
        await fill(database, clock, 2)
        result = await asyncio.to_thread(run_cli, database_url, "audit", "verify")
        assert result.returncode == 0, result.stderr
        last = result.stdout.strip().splitlines()[-1]
        assert last == f"head {await head_of(client)}"
        anchored = await asyncio.to_thread(run_cli, database_url, "audit", "verify",
                                           "--anchor", last.removeprefix("head "))
        assert anchored.returncode == 0, anchored.stderr
        assert HEAD_LINE.fullmatch(anchored.stdout.strip().splitlines()[-1])


class TestAnAnchorCatchesWhatTheChainCannot:
    async def test_deleting_the_newest_rows(self, client, database, clock, database_url):
        await fill(database, clock, 6)
        anchor = await head_of(client)
        kept = parse_anchor(anchor)
        await drop_protection(database)
        async with database.engine.begin() as connection:
            await connection.execute(text("DELETE FROM audit_events WHERE id > :id"),
                                     {"id": kept.id - 2})
        assert (await client.get("/api/v1/audit/verify")).json()["ok"] is True  # alone: blind
        body = (await client.get("/api/v1/audit/verify", params={"anchor": anchor})).json()
        assert body["ok"] is False
        assert body["head"]["id"] == kept.id - 2
        assert body["anchor"]["ok"] is False and "deleted" in body["anchor"]["reason"]
        cli = await asyncio.to_thread(run_cli, database_url, "audit", "verify",
                                      "--anchor", anchor)
        assert cli.returncode == 1
        assert "does NOT extend the anchor" in cli.stderr
        assert cli.stdout.strip().splitlines()[-1] == f"head {await head_of(client)}"

    async def test_rewriting_a_row_and_rehashing_everything_after_it(self, client, database,
                                                                     clock, database_url):
        await fill(database, clock, 4)
        older_anchor = await head_of(client)
        await fill(database, clock, 3)
        await rehash_from(database, 3, {"i": 99})
        assert (await client.get("/api/v1/audit/verify")).json()["ok"] is True  # alone: blind
        body = (await client.get("/api/v1/audit/verify",
                                 params={"anchor": older_anchor})).json()
        assert body["ok"] is False and "rewritten" in body["anchor"]["reason"]
        cli = await asyncio.to_thread(run_cli, database_url, "audit", "verify",
                                      "--anchor", older_anchor)
        assert cli.returncode == 1 and "rewritten" in cli.stderr

    async def test_an_untouched_log_extends_every_older_anchor(self, client, database, clock):
        anchors = []
        for _ in range(3):
            await fill(database, clock, 2)
            anchors.append(await head_of(client))
        for anchor in anchors:
            body = (await client.get("/api/v1/audit/verify", params={"anchor": anchor})).json()
            assert body["ok"] and body["anchor"]["ok"], anchor

    async def test_a_rewrite_after_the_anchor_is_the_chains_to_catch(self, database, clock):
        """An anchor vouches for the rows up to it; a row after it that was altered without
        rehashing still breaks the chain."""
        await fill(database, clock, 5)
        async with database.read() as session:
            third = await session.get(AuditEvent, 3)
        await drop_protection(database)
        async with database.engine.begin() as connection:
            await connection.execute(text("UPDATE audit_events SET actor = 'x' WHERE id = 4"))
        report = await verify(database, ChainHead(3, third.row_hash))
        assert not report.ok and report.first_broken.id == 4

    async def test_a_malformed_anchor_is_a_422_naming_it(self, client, database_url):
        for anchor in ("12", "0:" + "a" * 64, "3:xyz", "-1:" + "a" * 64, "3:" + "a" * 63):
            response = await client.get("/api/v1/audit/verify", params={"anchor": anchor})
            assert response.status_code == 422, anchor
            assert response.headers["content-type"] == "application/problem+json"
            assert [error["field"] for error in response.json()["errors"]] == ["anchor"]
        cli = await asyncio.to_thread(run_cli, database_url, "audit", "verify",
                                      "--anchor", "nonsense")
        assert cli.returncode == 2 and "--anchor" in cli.stderr


class TestThePurePieces:
    def test_parse_anchor(self):
        assert parse_anchor("17:" + "ab" * 32) == ChainHead(17, "ab" * 32)
        assert str(ChainHead(17, "ab" * 32)) == "17:" + "ab" * 32
        for bad in ("", "17", ":" + "a" * 64, "0:" + "a" * 64, "1:" + "g" * 64):
            with pytest.raises(ValueError):
                parse_anchor(bad)

    def test_anchor_mismatch(self):
        anchor = ChainHead(5, "a" * 64)
        assert anchor_mismatch(anchor, ChainHead(9, "b" * 64), "a" * 64) is None
        assert "deleted" in anchor_mismatch(anchor, ChainHead(4, "b" * 64), None)
        assert "empty" in anchor_mismatch(anchor, None, None)
        assert "rewritten" in anchor_mismatch(anchor, ChainHead(9, "b" * 64), "c" * 64)


class TestIdsStartAtOne:
    @pytest.mark.parametrize("row_id", [0, -1])
    async def test_the_database_refuses_an_id_below_one(self, database, clock, row_id):
        await fill(database, clock, 1)
        async with database.read() as session:
            first = await session.get(AuditEvent, 1)
        await drop_protection(database)  # even without the append-only triggers
        with pytest.raises(DBAPIError, match=r"(?i)check|positive_id"):
            async with database.engine.begin() as connection:
                await connection.execute(text(
                    "INSERT INTO audit_events (id, occurred_at, actor, action, subject_type, "
                    "subject_id, idempotency_key, details, prev_hash, row_hash) SELECT :id, "
                    "occurred_at, actor, action, subject_type, subject_id, idempotency_key, "
                    "details, prev_hash, row_hash FROM audit_events WHERE id = 1"),
                    {"id": row_id})
        assert (await verify(database)).ok and first is not None


class TestTheAnchorJob:
    async def test_it_writes_the_head_to_the_log_and_the_file(self, client, database, clock,
                                                              tmp_path):
        await fill(database, clock, 2)
        path = tmp_path / "anchors.txt"
        client.app.state.settings = client.app.state.settings.model_copy(
            update={"audit_anchor_file": str(path)})
        head = await head_of(client)  # (the run itself then appends its job.ran row)
        with capture_logs() as logged:
            first = (await client.post("/api/v1/jobs/audit_anchor/run")).json()
        assert first["status"] == "succeeded", first
        head_id, head_hash = head.split(":")
        assert first["result"]["head"] == {"id": int(head_id), "hash": head_hash}
        [line] = [entry for entry in logged if entry["event"] == "audit anchor"]
        assert line["anchor"] == head and line["audit_head_id"] == int(head_id)
        await fill(database, clock, 1)
        second = await head_of(client)
        await client.post("/api/v1/jobs/audit_anchor/run")
        lines = path.read_text().splitlines()
        assert [entry.split(" ")[1] for entry in lines] == [head, second]
        stamp = lines[0].split(" ")[0]
        assert stamp.endswith("Z") and datetime.fromisoformat(stamp).tzinfo is not None
        # the file's last line is what verify --anchor takes
        body = (await client.get("/api/v1/audit/verify", params={"anchor": second})).json()
        assert body["ok"] and body["anchor"]["ok"]

    async def test_without_a_file_it_only_logs(self, client):
        run = (await client.post("/api/v1/jobs/audit_anchor/run")).json()
        assert run["status"] == "succeeded"
        assert run["result"]["file"] is None and run["result"]["line"] is None
        assert run["result"]["head"]["id"] >= 1
