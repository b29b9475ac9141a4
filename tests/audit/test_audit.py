"""The audit log is append-only in the database itself, and its hash chain catches tampering."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from pipeline_console.audit.chain import ChainedContent, chain_hashes, row_hash
from pipeline_console.audit.service import (
    AuditEntry,
    append_audit,
    chained_content,
    verify_audit_chain,
)
from pipeline_console.models import AuditEvent
from tests.support import ingest, message


async def fill(database, clock, count=5):
    for i in range(count):
        async with database.transaction() as session:
            await append_audit(session, [AuditEntry("test.event", "test", str(i), {"i": i})],
                               actor="tester", now=clock.advance(seconds=1))


async def verify(database):
    async with database.read() as session:
        return await verify_audit_chain(session)


async def drop_protection(database):
    """What an attacker with DDL rights would do first."""
    async with database.engine.begin() as connection:
        if database.is_sqlite:
            await connection.execute(text("DROP TRIGGER audit_events_no_update"))
            await connection.execute(text("DROP TRIGGER audit_events_no_delete"))
        else:
            await connection.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))


class TestTheDatabaseRefusesChanges:
    @pytest.mark.parametrize("statement", [
        "UPDATE audit_events SET actor = 'someone else' WHERE id = 2",
        "DELETE FROM audit_events WHERE id = 2",
    ], ids=["update", "delete"])
    async def test_update_and_delete_are_refused(self, database, clock, statement):
        await fill(database, clock)
        with pytest.raises(DBAPIError, match="append-only"):
            async with database.engine.begin() as connection:
                await connection.execute(text(statement))
        assert (await verify(database)).ok

    async def test_emptying_the_table_is_refused(self, database, clock):
        """TRUNCATE on PostgreSQL (it bypasses row triggers, so it has its own);
        SQLite has no TRUNCATE, its equivalent is a DELETE without WHERE."""
        await fill(database, clock)
        statement = "DELETE FROM audit_events" if database.is_sqlite else "TRUNCATE audit_events"
        with pytest.raises(DBAPIError, match="append-only"):
            async with database.engine.begin() as connection:
                await connection.execute(text(statement))
        assert (await verify(database)).checked == 5


class TestTheHashChain:
    async def test_an_untouched_log_verifies(self, database, clock):
        await fill(database, clock, 7)
        await ingest(database, message(1), message(2))
        report = await verify(database)
        # 7 events + entity type registered + (accepted, promoted) for each version
        assert report.ok and report.checked == 7 + 1 + 4 and report.first_broken is None

    async def test_verify_spans_many_pages(self, database, clock):
        await fill(database, clock, 5)
        async with database.read() as session:
            report = await verify_audit_chain(session, page_size=2)
        assert report.ok and report.checked == 5

    async def test_an_altered_row_is_reported_as_the_first_broken_one(self, database, clock):
        await fill(database, clock, 6)
        await drop_protection(database)
        async with database.engine.begin() as connection:
            await connection.execute(text(
                "UPDATE audit_events SET details = '{\"i\": 99}' WHERE id = 4"))
        report = await verify(database)
        assert not report.ok
        assert report.first_broken.id == 4
        assert "altered" in report.first_broken.reason
        assert report.checked == 3

    async def test_a_deleted_row_is_reported(self, database, clock):
        await fill(database, clock, 6)
        await drop_protection(database)
        async with database.engine.begin() as connection:
            await connection.execute(text("DELETE FROM audit_events WHERE id = 3"))
        report = await verify(database)
        assert not report.ok and report.first_broken.id == 4
        assert "row 3 is missing" in report.first_broken.reason

    async def test_a_rehashed_row_still_breaks_the_next_link(self, database, clock):
        """Recomputing a tampered row's own hash is not enough: the next row points at the old."""
        await fill(database, clock, 4)
        async with database.read() as session:
            original = await session.get(AuditEvent, 2)
        forged = replace(chained_content(original), details={"i": 42})
        await drop_protection(database)
        async with database.engine.begin() as connection:
            await connection.execute(
                text("UPDATE audit_events SET details = '{\"i\": 42}', row_hash = :h "
                     "WHERE id = 2"),
                {"h": row_hash(original.prev_hash, forged)},
            )
        report = await verify(database)
        assert not report.ok and report.first_broken.id == 3
        assert "prev_hash" in report.first_broken.reason

    async def test_the_api_and_the_cli_report_the_broken_row(self, database, clock, client,
                                                             database_url):
        await fill(database, clock, 3)
        await drop_protection(database)
        async with database.engine.begin() as connection:
            await connection.execute(text("UPDATE audit_events SET actor = 'x' WHERE id = 2"))
        body = (await client.get("/api/v1/audit/verify")).json()
        assert body["ok"] is False and body["first_broken"]["id"] == 2 and body["checked"] == 1
        cli = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "pipeline_console.cli", "audit", "verify"],
            env={**os.environ, "PIPELINE_CONSOLE_DATABASE_URL": database_url},
            capture_output=True, text=True, timeout=60,
        )
        assert cli.returncode == 1
        assert "BROKEN at row 2" in cli.stderr



def _reference_row_hash(prev_hash, content):
    """The chain's hash as first written: every row through the rfc8785 library."""
    import hashlib

    import rfc8785

    from pipeline_console.audit.chain import _hashable

    body = rfc8785.dumps({
        "id": content.id,
        "occurred_at": content.occurred_at.astimezone(UTC).isoformat(timespec="microseconds"),
        "actor": content.actor, "action": content.action, "subject_type": content.subject_type,
        "subject_id": content.subject_id, "idempotency_key": content.idempotency_key,
        "details": _hashable(content.details),
    })
    return hashlib.sha256(prev_hash.encode() + b"\n" + body).hexdigest()


_DETAILS = st.dictionaries(
    st.one_of(st.text(max_size=4), st.sampled_from(["\ue000", "\U0001f600", "version"])),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=5),
                  st.floats(allow_nan=False, allow_infinity=False)),
        lambda children: st.one_of(st.lists(children, max_size=3),
                                   st.dictionaries(st.text(max_size=3), children, max_size=3)),
        max_leaves=8),
    max_size=5)


class TestTheFastHashIsTheChainsHash:
    """row_hash writes most rows with orjson; every hash must equal the rfc8785 one, so chains
    written before the change still verify."""

    @given(details=_DETAILS, actor=st.text(max_size=8), subject=st.text(max_size=8),
           row_id=st.integers(1, 2**53 - 1))
    def test_every_row_hashes_as_before(self, details, actor, subject, row_id):
        content = ChainedContent(
            id=row_id, occurred_at=datetime(2026, 11, 24, 10, 0, 0, 123, tzinfo=UTC),
            actor=actor, action="record.accepted", subject_type="record", subject_id=subject,
            idempotency_key=None, details=details)
        assert row_hash("0" * 64, content) == _reference_row_hash("0" * 64, content)

    @given(entries=st.lists(st.tuples(_DETAILS, st.one_of(st.none(), st.text(max_size=6))),
                            min_size=1, max_size=4),
           first_id=st.integers(1, 2**53 - 4))
    def test_a_batch_chains_and_hashes_as_row_by_row(self, entries, first_id):
        """chain_hashes (ingestion's path) hashes every row as the reference does, row by
        row."""
        moment = datetime(2026, 11, 24, 10, 0, 0, 123, tzinfo=UTC)
        prevs, hashes = chain_hashes("0" * 64, first_id, moment, "bench", [
            ("record.accepted", "record", f"s{n}", details, key)
            for n, (details, key) in enumerate(entries)])
        assert len(prevs) == len(hashes) == len(entries)
        prev = "0" * 64
        for n, (details, key) in enumerate(entries):
            content = ChainedContent(
                id=first_id + n, occurred_at=moment, actor="bench", action="record.accepted",
                subject_type="record", subject_id=f"s{n}", idempotency_key=key, details=details)
            assert (prevs[n], hashes[n]) == (prev, _reference_row_hash(prev, content))
            prev = hashes[n]
