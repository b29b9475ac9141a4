"""SQLite's write-ahead log is copied back into the database by a thread of each process
(db.WalCheckpointer), not inside the commits: the log stays bounded, every commit survives
a killed process, and PostgreSQL has no such thread."""

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text

from pipeline_console.config import Settings
from pipeline_console.db import (
    CHECKPOINT_FALLBACK_PAGES,
    Database,
    WalCheckpointer,
    bulk_insert,
    create_engine,
)
from pipeline_console.models import IngestionAttempt
from tests.support import wait_for

_attempts = IngestionAttempt.__table__
FILLER = "x" * 20_000  # about five pages per row


def _attempts_rows(first: int, count: int) -> list[dict]:
    now = datetime.now(UTC)
    return [{"id": n, "received_at": now, "decision": "accept_new", "reason": "test",
             "source_system": "erp", "entity_type": "customer", "entity_id": f"C-{n}",
             "idempotency_key": f"customer:C-{n}", "version": 1, "payload_hash": "h",
             "payload": {"filler": FILLER}, "message_id": None, "correlation_id": None,
             "occurred_at": None, "staging_status": None, "anomaly_id": None,
             "raw_body": None, "errors": None} for n in range(first, first + count)]


async def _autocheckpoint(database: Database) -> int:
    async with database.read() as session:
        return (await session.execute(text("PRAGMA wal_autocheckpoint"))).scalar_one()


def _wal_bytes(database_url: str) -> int:
    return os.path.getsize(database_url.removeprefix("sqlite+aiosqlite:///") + "-wal")


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    """A fresh migrated SQLite file: the checkpointer exists on SQLite only."""
    path = tmp_path / "pipeline.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
async def sqlite_database(sqlite_url: str) -> AsyncIterator[Database]:
    database = Database(create_engine(Settings(database_url=sqlite_url)))
    try:
        yield database
    finally:
        await database.dispose()


async def _write(database: Database, first: int, count: int) -> None:
    async with database.transaction() as session:
        await bulk_insert(session, _attempts, _attempts_rows(first, count))


async def test_only_a_sqlite_file_gets_a_checkpointer(database, backend):
    if backend == "postgresql":
        assert database.checkpointer is None
        return
    assert database.checkpointer is not None and not database.checkpointer.running
    # A commit copies the log back itself only as a safety net, far past SQLite's default.
    assert await _autocheckpoint(database) == CHECKPOINT_FALLBACK_PAGES


async def test_the_log_is_copied_back_after_each_commit_and_stays_bounded(
        sqlite_database, sqlite_url):
    database, checkpointer = sqlite_database, sqlite_database.checkpointer
    written = 0
    for round_ in range(12):
        before = checkpointer.rounds
        await _write(database, 1 + round_ * 40, 40)  # about 200 pages per transaction
        written += 40
        # woken by the commit, not by its five-second idle timer
        await wait_for(lambda b=before: checkpointer.rounds > b, 2, "a checkpoint round")
        busy, log_frames, copied = checkpointer.last
        assert busy == 0 and log_frames == copied > 0
    # Each transaction started on a fully copied log, so SQLite rewound it: the file holds
    # about one transaction, not the twelve (about 10 MB) written.
    assert _wal_bytes(sqlite_url) < 3 * 40 * 5 * 4096
    async with database.read() as session:
        count = (await session.execute(text("SELECT count(*) FROM ingestion_attempts")))
        assert count.scalar_one() == written
    await database.dispose()
    assert not checkpointer.running  # its connection closed: the file is free
    exclusive = sqlite3.connect(sqlite_url.removeprefix("sqlite+aiosqlite:///"))
    assert exclusive.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    assert exclusive.execute("PRAGMA journal_mode=WAL").fetchone() == ("wal",)
    exclusive.close()
    # and the Database still works: the next commit starts the thread again
    before = checkpointer.rounds
    await _write(database, 10_000, 1)
    await wait_for(lambda: checkpointer.rounds > before, 2, "a round after the restart")


async def test_commit_mode_leaves_it_to_sqlite(sqlite_url):
    database = Database(create_engine(Settings(database_url=sqlite_url,
                                               sqlite_checkpoint="commit")))
    try:
        assert database.checkpointer is None
        assert await _autocheckpoint(database) == 1000  # SQLite's own default
        await _write(database, 1, 300)  # about 1,500 pages: the commit copies them back
        assert _wal_bytes(sqlite_url) > 1000 * 4096
    finally:
        await database.dispose()


CHILD = textwrap.dedent("""
    import asyncio, sys
    from pipeline_console.config import Settings
    from pipeline_console.db import Database, bulk_insert, create_engine
    from tests.test_wal_checkpoint import _attempts, _attempts_rows

    async def main(url):
        database = Database(create_engine(Settings(database_url=url)))
        for round_ in range(10_000):
            async with database.transaction() as session:
                await bulk_insert(session, _attempts, _attempts_rows(1 + round_ * 20, 20))
            print(round_ + 1, flush=True)  # after the commit

    asyncio.run(main(sys.argv[1]))
""")


def test_a_process_killed_while_its_log_is_copied_back_loses_no_commit(sqlite_url):
    """The child commits as fast as it can while its checkpointer copies the log back; it is
    killed with SIGKILL mid-stream. Every commit it reported is there afterwards, and the
    file is intact."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, sqlite_url],
                             stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
    reported = 0
    try:
        for line in child.stdout:
            reported = int(line)
            if reported >= 40:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert reported >= 40, "the child stopped before committing 40 transactions"
    connection = sqlite3.connect(sqlite_url.removeprefix("sqlite+aiosqlite:///"))
    try:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        count = connection.execute("SELECT count(*) FROM ingestion_attempts").fetchone()[0]
        assert count >= reported * 20
    finally:
        connection.close()


async def test_a_checkpointer_that_cannot_open_the_file_says_so_and_tries_again_later(
        tmp_path, caplog):
    path = tmp_path / "not-yet.db"
    checkpointer = WalCheckpointer(str(path), idle_s=0.2)
    checkpointer.notify()  # the thread never creates the file: it logs and ends
    await wait_for(lambda: not checkpointer.running, 2, "the thread to end")
    assert "cannot open" in caplog.text and not path.exists()
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE t (x)")
    connection.commit()
    checkpointer.notify()  # within idle_s of the failure: not yet
    assert not checkpointer.running
    await asyncio.sleep(0.25)
    checkpointer.notify()
    try:
        await wait_for(lambda: checkpointer.rounds > 0, 2, "a checkpoint after the retry")
    finally:
        checkpointer.stop()
        connection.close()
