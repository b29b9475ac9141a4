"""db.unavailability: which database errors mean "not now, try again" (503, a loop waits)
and which are bugs or configuration errors (500). Every error here is a real one, raised by
the real drivers against real servers and sockets: a refused port, a host that does not
exist, a listener that never answers, a small server speaking the PostgreSQL protocol that
says "starting up", a proxy cut mid-transaction, a SQLite file locked by another connection."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import struct
import time
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

from pipeline_console.config import Settings
from pipeline_console.db import Database, create_engine, unavailability
from tests.fault_proxy import FaultProxy


def closed_port() -> int:
    """A port nothing listens on (it was free a moment ago): a connect is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def error_of(url: str, sql: str = "SELECT 1", **settings: object) -> BaseException:
    database = Database(create_engine(Settings(database_url=url, **settings)))
    try:
        async with database.transaction() as session:
            await session.execute(text(sql))
    except Exception as error:
        return error
    finally:
        await database.dispose()
    raise AssertionError(f"{sql} on {url} did not fail")


def _error_response(sqlstate: str, message: str) -> bytes:
    fields = b"".join(code + value.encode() + b"\0" for code, value in (
        (b"S", "FATAL"), (b"V", "FATAL"), (b"C", sqlstate), (b"M", message)))
    return b"E" + struct.pack("!i", 4 + len(fields) + 1) + fields + b"\0"


@pytest.fixture
async def refusing_server() -> AsyncIterator[list]:
    """A server on 127.0.0.1 that speaks just enough of the PostgreSQL protocol to refuse a
    session with an ErrorResponse, as a real server does while it starts up or is full.
    Append (sqlstate, message) to the yielded list: the next connection gets it."""
    answers: list[tuple[str, str]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            length, code = struct.unpack("!ii", await reader.readexactly(8))
            if code == 80877103:  # SSLRequest: "no", then the real startup packet
                writer.write(b"N")
                (length,) = struct.unpack("!i", await reader.readexactly(4))
                await reader.readexactly(length - 4)
            else:
                await reader.readexactly(length - 8)
            writer.write(_error_response(*answers.pop(0)))
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    answers.append(("", str(server.sockets[0].getsockname()[1])))  # the port, for the test
    try:
        yield answers
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A listener that accepts connections and never says a word."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def _pg(port: int, host: str = "127.0.0.1") -> str:
    return f"postgresql+asyncpg://postgres@{host}:{port}/postgres"


class TestPostgreSQLUnreachable:
    async def test_a_refused_connect_is_unreachable(self):
        error = await error_of(_pg(closed_port()))
        assert isinstance(error, DBAPIError)  # the ConnectionRefusedError, reported as such
        assert isinstance(error.orig.__cause__, ConnectionRefusedError)
        assert unavailability(error) == "unreachable"

    async def test_a_host_that_does_not_resolve_is_unreachable(self):
        error = await error_of(_pg(5432, host="no-such-host.invalid"))
        assert isinstance(error.orig.__cause__, socket.gaierror)
        assert unavailability(error) == "unreachable"

    async def test_a_connect_that_times_out_is_unreachable_and_takes_the_configured_time(
            self, silent_port):
        started = time.monotonic()
        error = await error_of(_pg(silent_port), database_connect_timeout_s=0.5)
        assert isinstance(error.orig.__cause__, TimeoutError)
        assert unavailability(error) == "unreachable"
        assert time.monotonic() - started < 5  # not asyncpg's default of 60 s

    async def test_a_server_starting_up_or_shutting_down_is_unreachable(self, refusing_server):
        port = int(refusing_server.pop()[1])
        for sqlstate, message in (("57P03", "the database system is starting up"),
                                  ("57P01", "terminating connection due to administrator "
                                            "command")):
            refusing_server.append((sqlstate, message))
            error = await error_of(_pg(port))
            assert isinstance(error, DBAPIError) and error.orig.sqlstate == sqlstate
            assert message in str(error)
            assert unavailability(error) == "unreachable", sqlstate

    async def test_a_server_with_too_many_connections_is_busy(self, refusing_server):
        port = int(refusing_server.pop()[1])
        refusing_server.append(("53300", "sorry, too many clients already"))
        error = await error_of(_pg(port))
        assert unavailability(error) == "busy"

    @pytest.mark.postgresql_only
    async def test_a_connection_lost_mid_transaction_is_unreachable(self, database_url):
        proxy = FaultProxy("127.0.0.1", make_url(database_url).port or 5432).start()
        url = make_url(database_url).set(port=proxy.port).render_as_string(hide_password=False)
        database = Database(create_engine(Settings(database_url=url)))
        try:
            with pytest.raises(DBAPIError) as lost:
                async with database.transaction() as session:
                    await session.execute(text("SELECT 1"))
                    proxy.cut()
                    await session.execute(text("SELECT 2"))
            assert unavailability(lost.value) == "unreachable"
            proxy.restore()
            async with database.read() as session:  # the pool recovers by itself
                assert await session.scalar(text("SELECT 3")) == 3
        finally:
            await database.dispose()
            proxy.stop()

    @pytest.mark.postgresql_only
    async def test_an_exhausted_pool_is_busy(self, database_url):
        engine = create_async_engine(database_url, pool_size=1, max_overflow=0,
                                     pool_timeout=0.1)
        try:
            async with engine.connect() as held:
                await held.execute(text("SELECT 1"))
                with pytest.raises(Exception) as exhausted:
                    async with engine.connect() as second:
                        await second.execute(text("SELECT 1"))
            assert unavailability(exhausted.value) == "busy"
        finally:
            await engine.dispose()


class TestBugsAndConfigurationErrorsAreNotOutages:
    async def test_a_violated_constraint_or_bad_sql_is_a_bug(self, database_url):
        database = Database(create_engine(Settings(database_url=database_url)))
        try:
            with pytest.raises(IntegrityError) as duplicate:
                async with database.transaction() as session:
                    await session.execute(text("CREATE TEMPORARY TABLE once (id INT PRIMARY KEY)"))
                    await session.execute(text("INSERT INTO once VALUES (1), (1)"))
            with pytest.raises(DBAPIError) as bad_sql:
                async with database.read() as session:
                    await session.execute(text("SELEC 1"))
            with pytest.raises(DBAPIError) as no_table:
                async with database.read() as session:
                    await session.execute(text("SELECT * FROM no_such_table"))
        finally:
            await database.dispose()
        for error in (duplicate.value, bad_sql.value, no_table.value):
            assert unavailability(error) is None, error

    @pytest.mark.postgresql_only
    async def test_a_database_or_role_that_does_not_exist_is_a_configuration_error(
            self, database_url):
        url = make_url(database_url)
        for wrong in (url.set(database="pc_no_such_database"), url.set(username="pc_nobody")):
            error = await error_of(wrong.render_as_string(hide_password=False))
            assert isinstance(error, DBAPIError) and unavailability(error) is None, error

    async def test_a_sqlite_file_that_cannot_be_opened_is_a_configuration_error(self, tmp_path):
        error = await error_of(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'folder.db'}")
        assert "unable to open database file" in str(error)
        assert unavailability(error) is None

    async def test_errors_that_are_not_the_database_s_are_not_outages(self):
        assert unavailability(ConnectionRefusedError(111, "refused")) is None  # not via the db
        assert unavailability(RuntimeError("boom")) is None


@pytest.mark.sqlite_only
async def test_a_sqlite_file_locked_by_another_connection_past_the_busy_timeout_is_busy(
        database_url):
    path = make_url(database_url).database
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # holds the write lock, as another process would
        error = await error_of(database_url, "DELETE FROM api_tokens",
                               sqlite_busy_timeout_ms=50)
    finally:
        other.close()
    assert "database is locked" in str(error)
    assert unavailability(error) == "busy"


class TestExceptionGroups:
    async def test_a_group_of_outages_is_an_outage_and_one_bug_makes_it_a_bug(self, database_url):
        refused = await error_of(_pg(closed_port()))
        bad_sql = await error_of(database_url, "SELEC 1")

        async def raise_(error: BaseException) -> None:
            raise error

        async def task_group_raising(*errors: BaseException) -> ExceptionGroup:
            with pytest.raises(ExceptionGroup) as raised:
                async with asyncio.TaskGroup() as group:  # the tasks all fail in one step
                    for error in errors:
                        group.create_task(raise_(error))
            assert len(raised.value.exceptions) == len(errors)
            return raised.value

        assert unavailability(await task_group_raising(refused, refused)) == "unreachable"
        assert unavailability(await task_group_raising(refused, bad_sql)) is None
        nested = ExceptionGroup("outer", [await task_group_raising(refused)])
        assert unavailability(nested) == "unreachable"
